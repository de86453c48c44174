"""Connecting to Ray: ``local`` (a cluster of this machine's CPUs, started here), ``local:N`` (N CPUs) or an
address of a running cluster (``ray://host:10001``, ``host:6379``, ``auto``)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from types import ModuleType

from engine.errors import EngineError, InvalidInputError

__all__ = ["RayCluster", "RAY_NAMESPACE", "import_ray", "unwrap_ray_error"]

log = logging.getLogger(__name__)

RAY_NAMESPACE = "engine"
_LOCAL = re.compile(r"local(?::(\d+))?")


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InvalidInputError("--ray needs the `ray` package, which is not installed: pip install 'ray>=2.9' (or the engine's extra: pip install -e '.[distributed]')") from None
    return ray


@dataclass
class RayCluster:
    """A connection to a Ray cluster; :meth:`close` shuts down only a cluster this object started."""

    spec: str
    started: bool

    @classmethod
    def connect(cls, spec: str) -> "RayCluster":
        ray = import_ray()
        spec = spec.strip()
        if not spec:
            raise InvalidInputError("--ray needs a cluster: local, local:N (N CPUs of this machine) or the address of a running cluster")
        local = _LOCAL.fullmatch(spec)
        if spec.startswith("local") and local is None:
            raise InvalidInputError(f"--ray {spec!r} is not understood; write local, local:N with N a positive integer, or a cluster address")
        if ray.is_initialized():  # a cluster the caller already joined (tests, notebooks): used as it is
            return cls(spec=spec, started=False)
        kwargs: dict[str, object] = {"namespace": RAY_NAMESPACE, "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
        if local is not None:
            cpus = local.group(1)
            if cpus is not None and int(cpus) < 1:
                raise InvalidInputError(f"--ray {spec!r}: a local cluster needs at least 1 CPU")
            if cpus is not None:
                kwargs["num_cpus"] = int(cpus)
        else:
            kwargs["address"] = spec
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"cannot connect to the Ray cluster {spec!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        log.info("Ray cluster %s: %s", spec, ray.cluster_resources())
        return cls(spec=spec, started=True)

    def cpus(self) -> int:
        """The CPUs of the cluster (at least 1)."""
        return max(1, int(import_ray().cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False


def unwrap_ray_error(exc: BaseException, *, doing: str, advice: str) -> EngineError:
    """The engine's own error raised inside a Ray task, or one line saying what failed and what to do."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EngineError):
        return cause
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineError(f"{doing}: a Ray worker failed ({type(exc).__name__}: {first[:200]}); {advice}")
