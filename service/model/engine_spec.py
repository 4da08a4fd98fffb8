"""Which engine to build and how, as one torch-free value checked once when it is made.

A worker makes its spec from the settings (`EngineSpec.from_settings`), the CLI from its flags,
a Python caller from keyword arguments; `service.model.engines.build_engine` turns any of them
into an engine. Every rule about which options go together lives in `EngineSpec.__post_init__`
(and the rules that need the resolved device or the weights, in `build_engine`). A message names
an option as its source spells it (`STEMSEG_ENGINE`, `--engine` or `kind`), through the spec's
`spelling`: the model layer never knows the CLI's flags or the settings' names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from service.config import Autocast, CompileMode, EngineKind, Settings
from service.errors import UserError
from service.model.presets import PRESETS  # plain dataclasses: no torch

ENGINES: tuple[str, ...] = get_args(EngineKind)
AUTOCAST_MODES: tuple[str, ...] = get_args(Autocast)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
TORCH_ONLY = ("autocast", "compile", "tf32")  # the torch engine's speed options


class EngineError(UserError, RuntimeError):
    """An engine that cannot run here, with a message meant for the user."""


@dataclass(frozen=True)
class Spelling:
    """How the options' source names them in messages: `names` maps a spec field to the user's
    word for it; `joiner` sits between a name and a value ("=" for settings, " " for flags)."""

    names: Mapping[str, str] = field(default_factory=dict)
    joiner: str = "="

    def __call__(self, name: str, value: object = None) -> str:
        word = self.names.get(name, name)
        return word if value is None else f"{word}{self.joiner}{value}"


# Spec field -> Settings field, where the two differ; the environment variable is STEMSEG_ + its upper case.
_SETTING_FIELDS = {"kind": "engine", "compile": "torch_compile"}
SETTINGS_SPELLING = Spelling({f: "STEMSEG_" + _SETTING_FIELDS.get(f, f).upper() for f in (
    "kind", "weights", "preset", "device", "onnx_dir", "trt_cache", "autocast", "compile", "tf32", "batch_max_size")})


def check_torch_options(compile: str, autocast: str) -> None:
    """The torch engine's compile mode and autocast dtype are ones it knows."""
    if compile not in COMPILE_MODES:
        raise EngineError(f"unknown torch.compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    if autocast not in AUTOCAST_MODES:
        raise EngineError(f"unknown autocast dtype {autocast!r}; choose one of {', '.join(AUTOCAST_MODES)}")


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides the engine: its kind, the network it runs (weights and preset for
    torch, exported graphs for the others), where, and the speed options that never change what
    the torch engine computes beyond its precision. Invalid combinations raise EngineError here."""

    kind: EngineKind = "torch"
    weights: str | Path | None = None  # a file, an official name, or None: the shipped model
    weights_dir: Path | None = None  # where official names are fetched to (default: the settings')
    preset: str | None = None  # None: the weights' own
    device: str = "auto"
    onnx_dir: Path | None = None
    trt_cache: Path | None = None
    autocast: Autocast = "off"
    compile: CompileMode = "off"
    tf32: bool = False
    min_dim: int | None = None  # inference short side instead of the preset's
    batch_max_size: int = 0  # > 1: a dynamic batcher shares the engine between callers
    batch_max_delay_ms: float = 5.0
    spelling: Spelling = field(default_factory=Spelling, compare=False, repr=False)

    def __post_init__(self) -> None:
        say = self.spelling
        if self.kind not in ENGINES:
            raise EngineError(f"{say('kind', repr(self.kind))} is not an engine; choose one of {', '.join(ENGINES)}")
        check_torch_options(self.compile, self.autocast)
        if self.preset is not None and self.preset not in PRESETS:
            raise EngineError(f"{say('preset', repr(self.preset))} is not a preset; choose one of {', '.join(PRESETS)}")
        if self.kind != "torch":
            if self.autocast != "off" or self.compile != "off" or self.tf32:
                raise EngineError(f"{', '.join(say(o) for o in TORCH_ONLY[:-1])} and {say(TORCH_ONLY[-1])} apply "
                                  f"to {say('kind', 'torch')} only")
            if self.onnx_dir is None:
                raise EngineError(f"{say('kind', self.kind)} needs {say('onnx_dir')} "
                                  "(graphs made by `stemseg export onnx`)")
        if self.batch_max_size > 1 and self.kind == "torch" and self.compile != "off":
            # Every merged batch size is a new shape: torch.compile (dynamic=False) would recompile per
            # size until its limit, then silently run eager (and capture a CUDA graph per size).
            raise EngineError(f"{say('batch_max_size')} > 1 and {say('compile')} together would recompile per "
                              "batch size; choose one")

    @property
    def needs_cuda(self) -> bool:
        return self.kind in ("onnxruntime-trt", "tensorrt")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineSpec:
        """The engine a service worker runs, exactly as configured (STEMSEG_ENGINE and the rest).
        One environment serves every engine (compose sets them all), so the torch engine's speed
        options are left unused, not refused, when another engine is configured."""
        torch_options = {"autocast": settings.autocast, "compile": settings.torch_compile, "tf32": settings.tf32} \
            if settings.engine == "torch" else {}
        return cls(kind=settings.engine, weights=settings.weights, weights_dir=settings.weights_dir,
                   preset=settings.preset, device=settings.device, onnx_dir=settings.onnx_dir,
                   trt_cache=settings.trt_cache, batch_max_size=settings.batch_max_size,
                   batch_max_delay_ms=settings.batch_max_delay_ms, spelling=SETTINGS_SPELLING, **torch_options)


__all__ = ["AUTOCAST_MODES", "COMPILE_MODES", "ENGINES", "SETTINGS_SPELLING", "Autocast", "CompileMode", "EngineError",
           "EngineKind", "EngineSpec", "Spelling", "check_torch_options"]
