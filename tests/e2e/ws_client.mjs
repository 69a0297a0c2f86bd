// A `ws` client for tests/test_e2e_node.py.
//
// Usage: node ws_client.mjs ws://127.0.0.1:PORT/ws
//
// Connects (through the proxy) to a WebSocket echo endpoint, sends every
// message at once, reads the echoes, pings, and closes with 1000. It checks
// nothing itself: it prints one JSON object saying what it sent and what came
// back (type, length and SHA-256 of each message), the pong's payload and the
// close code and reason it received, and the test compares them. It gives up
// after 20 seconds, printing what it has and exiting with status 3.
import { createHash } from "node:crypto";
import WebSocket from "ws";

const url = process.argv[2];
const GIVE_UP_MS = 20000;
const PING = Buffer.from("ping from node");
const CLOSE_REASON = "node is done";

// The same bytes on every run: xorshift32 from a fixed seed.
function pseudoRandomBytes(size, seed) {
  const out = Buffer.alloc(size);
  let x = seed >>> 0;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

// Short, non-ASCII, empty, one byte, every byte value, a 64-bit length, 1 MiB.
const MESSAGES = [
  "hello, proxy",
  "héllo wörld ✓ 𝄞",
  "",
  Buffer.from([0]),
  Buffer.from(Array.from({ length: 256 }, (_, i) => i)),
  "x".repeat(70000),
  pseudoRandomBytes(1 << 20, 6455),
];

function describe(data, binary) {
  const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data, "utf8");
  return {
    type: binary ? "binary" : "text",
    length: bytes.length,
    sha256: createHash("sha256").update(bytes).digest("hex"),
  };
}

const report = {
  sent: MESSAGES.map((m) => describe(m, Buffer.isBuffer(m))),
  received: [],
  extensions: null,
  pong: null,
  close: null,
  error: null,
};

function finish(status) {
  process.stdout.write(JSON.stringify(report) + "\n", () => process.exit(status));
}

setTimeout(() => {
  report.error = "timed out";
  finish(3);
}, GIVE_UP_MS).unref();

const ws = new WebSocket(url, { maxPayload: 4 << 20 });
ws.on("open", () => {
  report.extensions = ws.extensions;
  for (const message of MESSAGES) {
    ws.send(message, { binary: Buffer.isBuffer(message) });
  }
});
ws.on("message", (data, isBinary) => {
  report.received.push(describe(data, isBinary));
  if (report.received.length === MESSAGES.length) {
    ws.ping(PING);
  }
});
ws.on("pong", (data) => {
  report.pong = data.toString("utf8");
  ws.close(1000, CLOSE_REASON);
});
ws.on("close", (code, reason) => {
  report.close = { code, reason: reason.toString("utf8") };
  finish(0);
});
ws.on("error", (error) => {
  report.error = String(error);
  finish(1);
});
