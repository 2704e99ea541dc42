"""The product's error hierarchy: each message names the file, what was expected, what was found,
and the next step."""


class AdaptBIRError(Exception):
    """Base of every error the product raises on purpose."""


class ConfigError(AdaptBIRError):
    """A model configuration (preset or JSON file) is unknown or inconsistent."""


class CheckpointError(AdaptBIRError):
    """A checkpoint cannot be read, or its keys or shapes do not fit the model."""


class EngineError(AdaptBIRError):
    """An engine directory is missing, incomplete, tampered with or incompatible."""


class InputError(AdaptBIRError):
    """An input image cannot be used."""


class ArgumentError(InputError):
    """A restore argument is outside what the runtime accepts (checked before any engine runs)."""


def shortened(text: str, limit: int = 120) -> str:
    """`text` cut at `limit` characters for a one-line message, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
