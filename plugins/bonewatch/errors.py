"""The exception tree. Messages are one plain line and never carry a patient identifier."""


class BonewatchError(Exception):
    """Root of every error bonewatch raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class ConfigError(BonewatchError):
    """The configuration file or an environment override is invalid."""

    exit_code = 2


class RuleConfigError(ConfigError):
    """A rule's thresholds in the configuration are invalid."""


class SourceUnreadable(BonewatchError):
    """An input file cannot be read at all (encoding, header, framing)."""

    def __init__(self, path, line: int | None, reason: str):
        # one plain line that can be stored, whatever the reason quotes from the file (a line
        # break, a NUL, a lone surrogate from a JSON escape)
        reason = " ".join(str(reason).replace("\x00", " ").splitlines()).encode("utf-8", "replace").decode("utf-8")
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}, line {line}" if line else self.path
        super().__init__(f"cannot read {where}: {reason}")


class SourceUnavailable(BonewatchError):
    """An input location (inbox folder, SQL source) cannot be reached."""


class StoreError(BonewatchError):
    """The store is missing, unreachable or not migrated."""


class Busy(BonewatchError):
    """Another process holds a lock this one needs (a night, a delivery, the evaluation)."""

    def __init__(self, name: str, holder: str, waited_s: float):
        self.name, self.holder = name, holder
        super().__init__(f"{name} is held by {holder}; gave up after waiting {waited_s:g} s "
                         "(retry when it has finished)")


class AlertDeliveryError(BonewatchError):
    """The SMTP server did not accept a message."""


class NotFound(BonewatchError):
    """A named object (alert, file) does not exist."""


class SilenceError(BonewatchError):
    """A silence cannot be made or ended as asked (bad or too long a duration, no reason)."""

    exit_code = 2
