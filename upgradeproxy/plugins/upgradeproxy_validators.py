"""The built-in validators, as plugins for ``--validator NAME[:ARG]``."""

from upgradeproxy.registry import ValidatorPlugin, no_argument, token_list
from upgradeproxy.validators import (
    AllowValidator,
    OriginValidator,
    RFC9110Validator,
    WebSocketValidator,
)


def _rfc9110(argument: str | None) -> RFC9110Validator:
    if argument is None:
        return RFC9110Validator()
    if argument == "lenient-connection":
        return RFC9110Validator(lenient_connection=True)
    raise ValueError(f"rfc9110 takes no argument or 'lenient-connection', not {argument!r}")


rfc9110 = ValidatorPlugin(
    "rfc9110",
    "a 101 must name an offered protocol in Upgrade and list 'upgrade' in Connection "
    "(RFC 9110 §7.6.1, §7.8); ':lenient-connection' lets a missing Connection pass",
    _rfc9110,
    argument="[lenient-connection]",
)

websocket = ValidatorPlugin(
    "websocket",
    "WebSocket handshakes follow RFC 6455 §4: version 13, a valid key, the right "
    "Sec-WebSocket-Accept, only offered subprotocols and extensions",
    no_argument("websocket", WebSocketValidator),
)

allow = ValidatorPlugin(
    "allow",
    "only upgrades to these protocols pass; others get 403 before any backend is contacted",
    lambda argument: AllowValidator(token_list("allow", argument)),
    argument="TOKEN[,TOKEN...]",
)

origin = ValidatorPlugin(
    "origin",
    "WebSocket upgrades whose Origin matches no pattern get 403 (cross-site WebSocket hijacking)",
    lambda argument: OriginValidator(token_list("origin", argument)),
    argument="PATTERN[,PATTERN...]",
)
