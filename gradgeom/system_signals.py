"""Machine-health signals for the pause controller: GPU temperature/memory (NVML) and host memory.

Each source is optional. Without ``nvidia-ml-py`` (module ``pynvml``), without an NVIDIA driver,
or without ``psutil``, the corresponding fields read ``None`` ("not available") and the
controller's rules that need them stay quiet. A provider is anything with a ``read()`` method
returning :class:`SystemSignals`; tests fake one at exactly that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

__all__ = [
    "SystemSignals",
    "SystemSignalProvider",
    "NVMLProvider",
    "HostMemoryProvider",
    "CombinedProvider",
    "default_system_provider",
    "THERMAL_STATES",
]

#: Names of the thermal states, by value.
THERMAL_STATES = ("nominal", "fair", "serious", "critical")

# NVML clock-event bits (nvml.h: nvmlClocksEventReason*); stable values across driver versions.
_SW_THERMAL_SLOWDOWN = 0x20
_HW_THERMAL_SLOWDOWN = 0x40
_HW_POWER_BRAKE_SLOWDOWN = 0x80
_FAIR_MARGIN_C = 5.0


@dataclass(frozen=True)
class SystemSignals:
    """One reading of the machine's health. ``None`` means "not available".

    Attributes:
        gpu_temperature: GPU core temperature in °C.
        thermal_state: 0 nominal, 1 fair (within 5 °C of NVML's slowdown threshold),
            2 serious (software thermal slowdown active), 3 critical (hardware slowdown active).
        gpu_memory_fraction: used / total GPU memory as NVML reports it, in [0, 1].
        host_memory_fraction: host memory in use (psutil ``virtual_memory().percent / 100``).
    """

    gpu_temperature: Optional[float] = None
    thermal_state: Optional[int] = None
    gpu_memory_fraction: Optional[float] = None
    host_memory_fraction: Optional[float] = None

    def merged(self, other: "SystemSignals") -> "SystemSignals":
        """Fields of ``self``, with ``None`` filled in from ``other``."""
        return SystemSignals(
            *(a if a is not None else b for a, b in zip(
                (self.gpu_temperature, self.thermal_state, self.gpu_memory_fraction, self.host_memory_fraction),
                (other.gpu_temperature, other.thermal_state, other.gpu_memory_fraction, other.host_memory_fraction),
            ))
        )


class SystemSignalProvider(Protocol):
    """Anything that can report :class:`SystemSignals`."""

    def read(self) -> SystemSignals:
        """The machine's current signals; fields it cannot measure are None."""
        ...


class NVMLProvider:
    """GPU temperature, thermal state and memory through NVML (``pip install nvidia-ml-py``).

    Args:
        device: CUDA device index as torch numbers it (honours ``CUDA_VISIBLE_DEVICES`` by
            matching PCI bus ids), or None for ``torch.cuda.current_device()``.

    ``available`` is False (and every reading is ``None``) when pynvml is missing, NVML cannot be
    initialised (no driver) or the device cannot be found; ``unavailable_reason`` says which.
    """

    def __init__(self, device: Optional[int] = None) -> None:
        self.available = False
        self.unavailable_reason = ""
        self._nvml = None
        self._handle = None
        self._slowdown_c: Optional[float] = None
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            self.unavailable_reason = "pynvml (nvidia-ml-py) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses vary by driver state
            self.unavailable_reason = f"NVML could not be initialised: {exc}"
            return
        try:
            self._handle = _nvml_handle(pynvml, device)
        except Exception as exc:
            self.unavailable_reason = f"no NVML handle for CUDA device {device}: {exc}"
            return
        self._nvml = pynvml
        try:
            self._slowdown_c = float(pynvml.nvmlDeviceGetTemperatureThreshold(
                self._handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        except Exception:
            self._slowdown_c = None
        self.available = True

    def read(self) -> SystemSignals:
        """Read temperature, thermal state and memory (each ``None`` if NVML refuses it)."""
        if not self.available:
            return SystemSignals()
        nv, h = self._nvml, self._handle
        temperature = _try(lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        memory = _try(lambda: _memory_fraction(nv.nvmlDeviceGetMemoryInfo(h)))
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        reasons = _try(lambda: int(reasons_fn(h))) if reasons_fn is not None else None
        return SystemSignals(
            gpu_temperature=temperature,
            thermal_state=thermal_state(temperature, self._slowdown_c, reasons),
            gpu_memory_fraction=memory,
        )


def thermal_state(temperature: Optional[float], slowdown_c: Optional[float], reasons: Optional[int]) -> Optional[int]:
    """Thermal state 0–3 (see :class:`SystemSignals`) from a temperature (°C), the device's
    slowdown threshold (°C) and NVML clock-event reason bits; None when nothing is known."""
    if reasons is not None:
        if reasons & (_HW_THERMAL_SLOWDOWN | _HW_POWER_BRAKE_SLOWDOWN):
            return 3
        if reasons & _SW_THERMAL_SLOWDOWN:
            return 2
    if temperature is not None and slowdown_c is not None:
        return 1 if temperature >= slowdown_c - _FAIR_MARGIN_C else 0
    return 0 if reasons is not None else None


class HostMemoryProvider:
    """Host memory in use through ``psutil``; ``available`` is False without psutil."""

    def __init__(self) -> None:
        try:
            import psutil  # type: ignore[import-not-found]
        except ImportError:
            self._psutil = None
            self.available = False
            self.unavailable_reason = "psutil is not installed"
        else:
            self._psutil = psutil
            self.available = True
            self.unavailable_reason = ""

    def read(self) -> SystemSignals:
        """Host memory fraction in use (``None`` without psutil)."""
        if self._psutil is None:
            return SystemSignals()
        return SystemSignals(host_memory_fraction=float(self._psutil.virtual_memory().percent) / 100.0)


class CombinedProvider:
    """Reads several providers; for each field the first non-``None`` value wins."""

    def __init__(self, providers: Sequence[SystemSignalProvider]) -> None:
        self.providers = list(providers)

    def read(self) -> SystemSignals:
        """Merged reading of all providers."""
        out = SystemSignals()
        for provider in self.providers:
            out = out.merged(provider.read())
        return out


def default_system_provider(device: Optional[int] = None) -> CombinedProvider:
    """NVML (only when torch sees a CUDA device) plus psutil host memory; missing pieces read None."""
    import torch

    providers: list[SystemSignalProvider] = []
    if torch.cuda.is_available():
        providers.append(NVMLProvider(device))
    providers.append(HostMemoryProvider())
    return CombinedProvider(providers)


def _nvml_handle(pynvml, device: Optional[int]):
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device() if device is None else int(device)
        props = torch.cuda.get_device_properties(index)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            pass
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    return pynvml.nvmlDeviceGetHandleByIndex(0 if device is None else int(device))


def _memory_fraction(info) -> Optional[float]:
    total = float(info.total)
    return float(info.used) / total if total > 0 else None


def _try(fn):
    try:
        return fn()
    except Exception:
        return None
