"""ONNX Runtime: which distribution is installed, which execution provider to use, and proof that it loaded.

Four distributions ship the same `onnxruntime` Python package, one per hardware target; each is a
mutually exclusive extra of this project (pyproject.toml):

    cpu       onnxruntime            what `make setup` installs
    rocm      onnxruntime-rocm       ROCMExecutionProvider (ONNX Runtime dropped it in 1.23: the 1.22 line)
    migraphx  onnxruntime-migraphx   MIGraphXExecutionProvider, AMD's maintained path
    cuda      onnxruntime-gpu        CUDAExecutionProvider

Two of them in one environment overwrite each other's files (which one you get depends on install order),
so :func:`import_onnxruntime` refuses that, and an environment with none, with one line each.

ONNX Runtime does not fail when a GPU provider cannot load (a missing ROCm library, no device): it logs an
error and runs on the CPU, 100x slower. :func:`verify_session` compares what the session really loaded with
what was asked for and fails with one line naming the provider and the missing library, unless the caller
allows a CPU fallback, which is then returned so that it can be recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata as md
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError

log = logging.getLogger("qa_lora.ort_runtime")

# distribution -> the project extra that installs it
RUNTIME_EXTRAS: dict[str, str] = {
    "onnxruntime": "cpu",
    "onnxruntime-rocm": "rocm",
    "onnxruntime-migraphx": "migraphx",
    "onnxruntime-gpu": "cuda",
}
INSTALL_HINT = (
    "install exactly one ONNX Runtime extra: pip install -e '.[cpu]' (or '.[rocm]', '.[migraphx]', '.[cuda]')"
)
CPU = "CPUExecutionProvider"
# Preference order when `export.provider` is auto: AMD first (the production GPU), then NVIDIA, then CPU.
PROVIDER_PRIORITY: tuple[str, ...] = (
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
    "CUDAExecutionProvider",
    CPU,
)
PROVIDER_NAMES: dict[str, str] = {
    "MIGraphX": "MIGraphXExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "CPU": CPU,
}
# The shared library each GPU provider lives in (onnxruntime/capi/), loaded lazily by ONNX Runtime.
_PROVIDER_LIBRARIES: dict[str, str] = {
    "MIGraphXExecutionProvider": "libonnxruntime_providers_migraphx.so",
    "ROCMExecutionProvider": "libonnxruntime_providers_rocm.so",
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
}
_INSTALL_FOR: dict[str, str] = {
    "ROCMExecutionProvider": "install the rocm extra (onnxruntime-rocm 1.22) in place of the current runtime",
    "MIGraphXExecutionProvider": "install the migraphx extra (onnxruntime-migraphx) in place of the current runtime",
    "CUDAExecutionProvider": "install the cuda extra (onnxruntime-gpu) in place of the current runtime",
}


class ProviderUnavailable(UserError):
    """The wanted GPU execution provider did not load; ONNX Runtime would have run on the CPU instead."""


# ------------------------------------------------------------------------------------ distributions


def installed_runtimes() -> list[tuple[str, str]]:
    """The installed distributions that provide the `onnxruntime` package, as (name, version), sorted.

    Any `onnxruntime*` distribution whose top-level package is `onnxruntime` counts (so onnxruntime-openvino
    or -directml do too); onnxruntime-genai and -extensions, which ship other packages, do not.
    """
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("onnxruntime") and _provides_onnxruntime(dist):
            found[name] = dist.version
    return sorted(found.items())


def _provides_onnxruntime(dist: md.Distribution) -> bool:
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        return "onnxruntime" in top_level.split()
    return any(str(f).startswith("onnxruntime/") for f in dist.files or ())


def runtime_requirement() -> str | None:
    """The pip requirement pinning the installed runtime (e.g. `onnxruntime-rocm==1.22.2.post3`), for a
    model logged to run where it was built; None when none or several are installed."""
    runtimes = installed_runtimes()
    return f"{runtimes[0][0]}=={runtimes[0][1]}" if len(runtimes) == 1 else None


def import_onnxruntime() -> Any:
    """`import onnxruntime`, after checking that exactly one runtime distribution is installed.

    Raises:
        UserError: no runtime installed (names the extras), several installed (names them and how to keep
            one), or the package does not import (a broken install).
    """
    runtimes = installed_runtimes()
    if not runtimes:
        raise UserError(f"onnxruntime: no ONNX Runtime is installed; {INSTALL_HINT}")
    if len(runtimes) > 1:
        names = ", ".join(f"{n} {v}" for n, v in runtimes)
        raise UserError(
            f"onnxruntime: {len(runtimes)} ONNX Runtime distributions are installed ({names}) and overwrite "
            f"each other's files; pip uninstall -y {' '.join(n for n, _ in runtimes)}, then {INSTALL_HINT}"
        )
    try:
        import onnxruntime
    except ImportError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"onnxruntime: {runtimes[0][0]} {runtimes[0][1]} is installed but does not import ({first}); "
            f"reinstall it: {INSTALL_HINT}"
        ) from None
    return onnxruntime


def describe_runtime() -> dict[str, Any]:
    """The `qa-lora info` report on ONNX Runtime: distributions, version, providers, the auto choice.

    Never raises: a missing or doubled runtime is reported under "problem".
    """
    report: dict[str, Any] = {
        "distributions": [f"{n} {v}" for n, v in installed_runtimes()],
        "extra": None,
        "providers": [],
        "auto_provider": None,
        "problem": None,
    }
    try:
        ort = import_onnxruntime()
    except UserError as exc:
        report["problem"] = str(exc)
        return report
    report["extra"] = RUNTIME_EXTRAS.get(installed_runtimes()[0][0])
    report["providers"] = list(ort.get_available_providers())
    with contextlib.suppress(UserError):
        report["auto_provider"] = choose_provider(report["providers"]).name
    return report


# ---------------------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class ProviderChoice:
    """The execution provider picked for ONNX Runtime, with the fallback list a session is given."""

    name: str
    providers: tuple[str, ...]
    available: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "providers": list(self.providers),
            "available": list(self.available),
            "reason": self.reason,
        }


def choose_provider(available: Sequence[str], requested: str = "auto") -> ProviderChoice:
    """Pick the ONNX Runtime execution provider (pure: the installed list is an argument).

    Args:
        available: what `onnxruntime.get_available_providers()` reports (faked in tests).
        requested: `export.provider`: "auto", or one of MIGraphX, ROCM, CUDA, CPU (short or full name).

    Returns:
        The choice; `providers` puts it first and CPU last, as ONNX Runtime falls back per node.

    Raises:
        UserError: a requested provider that this onnxruntime build does not have.
    """
    avail = tuple(available)
    if requested == "auto":
        for name in PROVIDER_PRIORITY:
            if name in avail:
                skipped = list(PROVIDER_PRIORITY[: PROVIDER_PRIORITY.index(name)])
                why = f"auto: first of {', '.join(p.removesuffix('ExecutionProvider') for p in PROVIDER_PRIORITY)}"
                why += f" installed (not installed: {', '.join(skipped)})" if skipped else " installed"
                return ProviderChoice(name, _with_cpu(name), avail, why)
        # Every onnxruntime build has the CPU provider; a list without it is a broken install.
        raise UserError(f"onnxruntime reports no usable execution provider (available: {list(avail)})")
    name = PROVIDER_NAMES.get(requested, requested)
    if name not in avail:
        hint = _INSTALL_FOR.get(name, "use auto")
        raise UserError(
            f"export.provider: {requested!r} is not available in this onnxruntime "
            f"(available: {', '.join(avail) or 'none'}); {hint}"
        )
    return ProviderChoice(name, _with_cpu(name), avail, "requested by export.provider")


def cpu_choice(available: Sequence[str], reason: str) -> ProviderChoice:
    """The CPU provider alone: what runs after a recorded fallback, so later sessions do not retry."""
    return ProviderChoice(CPU, (CPU,), tuple(available), reason)


def _with_cpu(name: str) -> tuple[str, ...]:
    return (name,) if name == CPU else (name, CPU)


# ------------------------------------------------------------------------------------- verification


def create_session(
    model: str | bytes,
    choice: ProviderChoice,
    session_options: Any = None,
    allow_cpu_fallback: bool = False,
) -> tuple[Any, str | None]:
    """An InferenceSession on `choice.providers`, checked to run on the provider that was chosen.

    ONNX Runtime prints its own fallback notice to stdout; it is sent to stderr here, so that a command
    whose stdout is JSON (the CLI) stays parseable.

    Args:
        model: the graph's path (or its bytes).
        choice: from :func:`choose_provider`.
        session_options: `onnxruntime.SessionOptions`, or None for the defaults.
        allow_cpu_fallback: `export.allow_cpu_fallback`: warn instead of failing when the GPU provider
            did not load.

    Returns:
        The session and, when it fell back to the CPU (allowed), the one-line reason; else None.

    Raises:
        ProviderUnavailable: the chosen GPU provider did not load and the fallback is not allowed.
    """
    ort = import_onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    with contextlib.redirect_stdout(sys.stderr):
        session = ort.InferenceSession(source, sess_options=session_options, providers=list(choice.providers))
    fallback = verify_session(session.get_providers(), choice, allow_cpu_fallback)
    return session, fallback


def verify_session(loaded: Sequence[str], choice: ProviderChoice, allow_cpu_fallback: bool) -> str | None:
    """Check that a session's providers (`session.get_providers()`) include the chosen one.

    Args:
        loaded: the providers the session really has (faked in tests).
        choice: what was asked for.
        allow_cpu_fallback: warn and return the reason instead of raising.

    Returns:
        None when the chosen provider loaded; the fallback reason when it did not and that is allowed.

    Raises:
        ProviderUnavailable: the chosen provider is not among `loaded` and no fallback is allowed.
    """
    if choice.name in loaded:
        return None
    why = provider_load_error(choice.name)
    message = f"ONNX Runtime could not load {choice.name} ({why}); the session has only {', '.join(loaded) or 'none'}"
    if not allow_cpu_fallback:
        raise ProviderUnavailable(
            f"{message}; fix the GPU runtime, or set export.allow_cpu_fallback=true to run on the CPU"
        )
    log.warning("%s; running on the CPU (export.allow_cpu_fallback=true)", message)
    return message


def provider_load_error(provider: str) -> str:
    """Why a provider's shared library does not load, e.g. `libhipblas.so.3: cannot open shared object
    file`, found by loading it the way ONNX Runtime does; a generic reason when it loads or is unknown."""
    library = _PROVIDER_LIBRARIES.get(provider)
    if library is None:
        return "no reason reported; see ONNX Runtime's log above"
    try:
        capi = Path(import_onnxruntime().__file__).parent / "capi"
    except UserError as exc:
        return str(exc)
    path = capi / library
    if not path.is_file():
        return f"{library} is not part of this onnxruntime build"
    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        first = (str(exc).strip().splitlines() or ["cannot be loaded"])[0]
        return f"missing library: {first}"
    return f"{library} loads, so no usable device was found (check the driver and the visible devices)"


def probe_provider(choice: ProviderChoice, allow_cpu_fallback: bool = False) -> str | None:
    """Load the chosen provider on a one-node graph before any expensive work (a 7B merge takes minutes).

    Returns:
        None when it loaded; the fallback reason when it did not and that is allowed.

    Raises:
        ProviderUnavailable: the provider did not load and no fallback is allowed.
    """
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    # IR 10 / opset 18: what every runtime this project supports reads (onnxruntime-rocm 1.22 included).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    _session, fallback = create_session(
        model.SerializeToString(), choice, allow_cpu_fallback=allow_cpu_fallback
    )
    return fallback
