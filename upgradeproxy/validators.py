"""Built-in upgrade validators."""

from __future__ import annotations

from zope.interface import implementer

from .interfaces import IUpgradeValidator, Refusal, UpgradeAttempt


def unsolicited_switch(attempt: UpgradeAttempt) -> Refusal | None:
    """Refuse a ``101`` to a request that did not ask to upgrade.

    The proxy applies this rule itself whatever the validator chain says: a
    client that did not ask for a switch cannot speak the new protocol.
    """
    if attempt.is_upgrade:
        return None
    return Refusal(
        "the backend answered 101 to a request that did not ask to upgrade (RFC 9110 §15.2.2)"
    )


@implementer(IUpgradeValidator)
class RFC9110Validator:
    """The rules of RFC 9110 §7.6.1 and §7.8 for a switch, applied strictly.

    A ``101`` must carry ``Upgrade`` naming only protocols the client offered,
    must list ``upgrade`` in ``Connection`` (``Upgrade`` is a connection
    option), must have no body framing fields, and may only come after the
    whole request body.
    """

    name = "rfc9110"

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        return None

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        refusal = unsolicited_switch(attempt)
        if refusal is not None:
            return refusal
        response = attempt.response
        assert response is not None
        selected = attempt.selected
        if not selected:
            return Refusal(
                "the backend answered 101 without an Upgrade header naming the new protocol "
                "(RFC 9110 §7.8)"
            )
        if b"upgrade" not in response.headers.tokens(b"connection"):
            return Refusal(
                "the backend answered 101 without 'Connection: upgrade' (RFC 9110 §7.6.1)"
            )
        offered = {p.lower() for p in attempt.offered}
        for protocol in selected:
            if protocol.lower() not in offered:
                return Refusal(
                    f"the backend switched to {protocol.decode('latin-1')!r}, which the client "
                    f"did not offer (it offered "
                    f"{', '.join(p.decode('latin-1') for p in attempt.offered)}) "
                    "(RFC 9110 §7.8)"
                )
        for name in (b"content-length", b"transfer-encoding"):
            if response.headers.has(name):
                return Refusal(
                    f"the backend's 101 carries {name.decode().title()}, but a 1xx response "
                    "has no content (RFC 9110 §8.6, RFC 9112 §6.1)"
                )
        if not attempt.request_body_complete:
            return Refusal(
                "the backend answered 101 before the whole request body was sent (RFC 9110 §7.8)"
            )
        return None
