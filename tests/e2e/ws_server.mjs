// A `ws` echo server for tests/test_e2e_node.py.
//
// Usage: node ws_server.mjs [--deflate]
//
// Listens on 127.0.0.1 on a free port and reports, one JSON object per line
// on stdout: {"event": "listening", "port": N}, then for each connection its
// request and negotiated extensions, the pings it receives (answered by ws
// itself), the pong to the ping it sends when a connection opens, and the
// close code and reason it receives. Every message is echoed as it came
// (text as text, binary as binary). --deflate enables permessage-deflate.
// It runs until it gets SIGTERM.
import { WebSocketServer } from "ws";

const deflate = process.argv.includes("--deflate");
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const wss = new WebSocketServer({
  host: "127.0.0.1",
  port: 0,
  perMessageDeflate: deflate,
  maxPayload: 4 << 20,
});
wss.on("listening", () => say({ event: "listening", port: wss.address().port }));
wss.on("connection", (ws, request) => {
  say({
    event: "connection",
    path: request.url,
    offered: request.headers["sec-websocket-extensions"] ?? null,
    extensions: ws.extensions,
  });
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on("ping", (data) => say({ event: "ping", data: data.toString("utf8") }));
  ws.on("pong", (data) => say({ event: "pong", data: data.toString("utf8") }));
  ws.on("close", (code, reason) => say({ event: "close", code, reason: reason.toString("utf8") }));
  ws.ping(Buffer.from("ping from node"));
});
process.on("SIGTERM", () => {
  for (const ws of wss.clients) ws.terminate();
  wss.close(() => process.exit(0));
});
