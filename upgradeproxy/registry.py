"""Finding validators by name, and building the chain ``--validator`` asks for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from .interfaces import IUpgradeValidator, IValidatorPlugin

#: The chain used when no ``--validator`` is given.
DEFAULT_CHAIN = ("rfc9110", "websocket")


class BadValidator(ValueError):
    """A ``--validator`` value that cannot be used; the message says what to do."""


@implementer(IPlugin, IValidatorPlugin)
@dataclass(frozen=True)
class ValidatorPlugin:
    """A validator plugin made of a name, a description and a function.

    ``make`` receives the text after the colon (or ``None``) and returns the
    validator, raising :class:`ValueError` for a bad argument.
    """

    name: str
    description: str
    maker: Callable[[str | None], IUpgradeValidator]
    argument: str | None = None

    def make(self, argument: str | None) -> IUpgradeValidator:
        return self.maker(argument)


def no_argument(
    name: str, validator: Callable[[], IUpgradeValidator]
) -> Callable[[str | None], IUpgradeValidator]:
    """A maker for a validator that takes no argument."""

    def make(argument: str | None) -> IUpgradeValidator:
        if argument is not None:
            raise ValueError(f"{name} takes no argument (write --validator {name})")
        return validator()

    return make


def token_list(name: str, argument: str | None) -> list[str]:
    """Split a comma-separated argument, insisting on at least one element."""
    items = [item.strip() for item in (argument or "").split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name} needs a list, for example --validator {name}:A,B")
    return items


def installed_validators() -> dict[str, IValidatorPlugin]:
    """Every validator plugin installed, by name."""
    from . import plugins

    found: dict[str, IValidatorPlugin] = {}
    for plugin in getPlugins(IValidatorPlugin, plugins):
        found.setdefault(plugin.name, plugin)
    return dict(sorted(found.items()))


def describe_installed(installed: dict[str, IValidatorPlugin] | None = None) -> str:
    """One line per installed validator, for ``--list-validators``."""
    installed = installed_validators() if installed is None else installed
    width = max((len(_usage(p)) for p in installed.values()), default=0)
    return "\n".join(f"{_usage(p):<{width}}  {p.description}" for p in installed.values())


def _usage(plugin: IValidatorPlugin) -> str:
    argument = plugin.argument
    if not argument:
        return str(plugin.name)
    if argument.startswith("["):  # optional: rfc9110[:lenient-connection]
        return f"{plugin.name}[:{argument[1:]}"
    return f"{plugin.name}:{argument}"


def build_chain(
    specs: Iterable[str], installed: dict[str, IValidatorPlugin] | None = None
) -> list[IUpgradeValidator]:
    """The validators that ``NAME[:ARG]`` specs ask for, in order.

    Raises :class:`BadValidator` for an unknown name (listing what is
    installed) or a bad argument (saying what to write).
    """
    installed = installed_validators() if installed is None else installed
    chain = []
    for spec in specs:
        name, colon, argument = spec.partition(":")
        plugin = installed.get(name)
        if plugin is None:
            raise BadValidator(
                f"unknown validator {name!r}; installed: {', '.join(installed) or 'none'} "
                "(see --list-validators)"
            )
        if colon and not plugin.argument:
            raise BadValidator(
                f"--validator {spec}: {name} takes no argument (write --validator {name})"
            )
        try:
            chain.append(plugin.make(argument if colon else None))
        except ValueError as e:
            raise BadValidator(f"--validator {spec}: {e}") from None
    return chain
