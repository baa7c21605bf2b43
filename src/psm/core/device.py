"""Device names from configs and flags, checked before anything is written."""

from __future__ import annotations

import torch

from ..errors import PSMError

DEVICE_HELP = "cpu, cuda, cuda:N or auto"


class DeviceError(PSMError, ValueError):
    """A device that is not one, or not here."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; anything else as given, checked.

    Raises:
        DeviceError: not a device name, CUDA missing, or no such GPU index.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{name!r} is not a device ({DEVICE_HELP})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name}: there are {torch.cuda.device_count()} GPU(s) here")
    elif dev.type != "cpu":
        raise DeviceError(f"{name!r}: psm trains on {DEVICE_HELP}")
    return dev
