"""Plan files: a workload, a target load (or a day's forecast), an SLO, and the deployments to choose from.

A plan expands into candidates. Each is a list of `--set` style overrides of the
base workload: a catalog GPU at one tensor-parallel size (its replicas searched), a
hosted API in place of the endpoint, a mix of the two (classes split between them,
or a burst to the API through the replicas' queue overflow; replicas searched), or a
config the user wrote out. Every probe of every candidate runs with the plan's seed
(common random numbers), so candidates are compared on the same traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from sim.catalog import CatalogError, gpu, model
from sim.catalog.catalog import normalise
from sim.config.base import MAX_COUNT, MAX_PRICE_USD, MAX_REPLICATIONS
from sim.config.loader import ConfigError, load_yaml_with_lines, validate_model
from sim.config.schema import Workload
from sim.config.serving import Autoscale

from ..spec import (
    LOAD_AXIS,
    Block,
    Bound,
    Experiment,
    LoadedExperiment,
    NamedWithSlo,
    override,
    with_base_workload,
)

SCALINGS = ("fixed", "scheduled", "autoscaled")


class Replicas(Block):
    """The replica counts a self-hosted candidate may use."""

    min: int = Field(1, ge=1, le=MAX_COUNT, description="Fewest replicas.")
    max: int = Field(ge=1, le=MAX_COUNT, description="Most replicas (the search never goes past them).")

    @model_validator(mode="after")
    def _ordered(self) -> "Replicas":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class SelfHostedSpace(Block):
    """Self-hosted candidates: every GPU type at every tensor-parallel size, replicas searched."""

    model: Optional[str] = Field(None, description="Catalog model (or a Hugging Face config.json) the replicas "
                                 "serve (default: the workload endpoint's engine.model).")
    gpus: list[str] = Field(min_length=1, description="Catalog GPU names (`llmsim catalog` lists them).")
    tensor_parallel: list[int] = Field([1], min_length=1, description="GPUs per replica to try.")
    replicas: Replicas = Field(description="Replica range: {min, max}.")
    scaling: list[Literal["fixed", "scheduled", "autoscaled"]] = Field(
        ["fixed"], min_length=1, description="fixed: one fleet all day, sized for the busiest period; scheduled "
        "(with a forecast): replicas set per period, each sized for its own load (a schedule: scale-up delays are "
        "not simulated); autoscaled: the autoscaler sizes the fleet within the replica range by its policy "
        "(`autoscale`), simulated, and the plan checks the SLO and bills the replica-hours it holds.")
    autoscale: dict[str, Any] = Field(
        default_factory=lambda: {"metric": "utilisation", "target": 0.6}, description="The autoscaled candidates' "
        "policy: an autoscale block without min_replicas and max_replicas (the replica range's).")
    gpu_hourly_usd: dict[str, float] = Field(
        default_factory=dict, description="Your price of one GPU per hour, by GPU name (default: the catalog's).")
    engine: Optional[dict[str, Any]] = Field(
        None, description="Engine settings besides gpu, model and tensor_parallel (default: the endpoint's own "
        "engine block without its hardware: no typed step-time coefficients or KV capacity).")

    @field_validator("tensor_parallel")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(t < 1 for t in sizes):
            raise ValueError("tensor-parallel sizes are whole numbers of at least 1")
        if len(set(sizes)) < len(sizes):
            raise ValueError("a tensor-parallel size is listed twice")
        return sizes

    @model_validator(mode="after")
    def _prices_of_listed_gpus(self) -> "SelfHostedSpace":
        listed = {normalise(g) for g in self.gpus}
        stray = [k for k in self.gpu_hourly_usd if normalise(k) not in listed]
        if stray:
            raise ValueError(f"gpu_hourly_usd.{stray[0]}: not one of the gpus listed ({', '.join(self.gpus)})")
        if len(listed) < len(self.gpus):
            raise ValueError("gpus: a GPU is listed twice")
        return self

    @field_validator("gpu_hourly_usd")
    @classmethod
    def _prices(cls, prices: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in prices.items() if not 0 <= v <= MAX_PRICE_USD]
        if bad:
            raise ValueError(f"{bad[0]}: a price per GPU-hour is between 0 and {MAX_PRICE_USD:g}")
        return prices


class Mix(Block):
    """A self-hosted GPU group with a hosted API beside it: each class's requests split between the two by
    share, or the replicas' overflow sent to the API while their queue is long, or both."""

    gpu: str = Field(description="Catalog GPU of the self-hosted replicas (model, replicas and prices: self_hosted's).")
    tensor_parallel: int = Field(1, ge=1, description="GPUs per replica.")
    api: str = Field(description="The API beside them: a name under apis (it becomes a model endpoint of that name).")
    to_self_hosted: dict[str, float] = Field(
        default_factory=dict, description="Class -> the share of its requests the self-hosted replicas serve (0 to "
        "1); the rest go to the API. Classes not named keep their endpoint.")
    overflow_above: Optional[int] = Field(
        None, ge=0, le=MAX_COUNT, description="Send a request to the API instead when this many already wait at the "
        "replicas (0: whenever they are all full): their queue.overflow.")

    @model_validator(mode="after")
    def _some_split(self) -> "Mix":
        if not self.to_self_hosted and self.overflow_above is None:
            raise ValueError("give to_self_hosted (a split by class), overflow_above (a burst to the API), or both")
        return self

    @field_validator("to_self_hosted")
    @classmethod
    def _shares(cls, shares: dict[str, float]) -> dict[str, float]:
        bad = [c for c, v in shares.items() if not 0 <= v <= 1]
        if bad:
            raise ValueError(f"{bad[0]}: a share is between 0 and 1")
        return shares


class Period(Block):
    """A part of the day at one load."""

    load: float = Field(gt=0, description="Load, in units of the load axis (rate_scale by default).")
    hours: float = Field(gt=0, le=24, description="Hours a day at this load.")


class Plan(NamedWithSlo):
    """`llmsim plan`: the cheapest deployment that meets the SLO."""

    version: Literal[1] = 1
    kind: Literal["plan"] = Field(description="Always `plan` (tells a plan from a sweep).")
    name: Optional[str] = Field(None, description="Name of the plan (default: the file name); names reports/<name>/.")
    description: Optional[str] = Field(None, description="A line under the report's title.")
    workload: str = Field(description="Base workload file, relative to this file.")
    endpoint: Optional[str] = Field(None, description="The workload's model endpoint to provision "
                                    "(default: its only one, or its only self-hosted one).")
    target: Optional[float] = Field(None, gt=0, description="Load to plan for, in units of the load axis.")
    forecast: Optional[list[Period]] = Field(None, min_length=1, description="A day's loads instead of one "
                                             "target: [{load, hours}], hours summing to 24.")
    load_axis: str = Field(LOAD_AXIS, description="The config path that sets the load.")
    slo: dict[str, Bound] = Field(min_length=1, description="metric -> bound, judged on the pessimistic end of its "
                                  "95% interval; a number means max.")
    replications: Optional[int] = Field(None, ge=2, le=MAX_REPLICATIONS,
                                        description="Replications per probe (default: the workload's; at least 2).")
    seed: Optional[int] = Field(None, ge=0, description="Root seed of every probe (default: the workload's).")
    keep: int = Field(3, ge=1, le=100, description="Candidates ranked in full: a candidate that cannot beat the "
                      "keep-th cheapest found so far is stopped early.")
    min_served_share: float = Field(
        0.99, ge=0, le=1, description="Share of the requests (those their users do not cancel) a deployment must "
        "answer in full, besides the SLO: not rejected, rate-limited, expired, timed out, partial or unfinished. "
        "Latencies of the answered ones alone would favour a deployment that drops requests. Lower it where your "
        "own limits refuse some on purpose.")
    self_hosted: Optional[SelfHostedSpace] = Field(None, description="Catalog GPUs x tensor parallelism x replicas.")
    apis: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Hosted API endpoints by name, each "
                                            "a `kind: api` model block that takes the endpoint's place.")
    mixes: dict[str, Mix] = Field(default_factory=dict, description="Self-hosted replicas with an API beside them, "
                                  "classes split between the two; replicas searched as self_hosted's.")
    configs: dict[str, Union[dict[str, Any], list[str]]] = Field(
        default_factory=dict, description="Deployments written out: {path: value} or 'path=value' overrides each "
        "(a mix, such as a class routed to an API); simulated as given, no replica search.")

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        if (self.target is None) == (self.forecast is None):
            raise ValueError("give target (one load) or forecast (a day's loads), not both")
        if self.forecast is not None and abs(sum(p.hours for p in self.forecast) - 24.0) > 1e-6:
            raise ValueError(f"forecast: the hours sum to {sum(p.hours for p in self.forecast):g}, not 24")
        if self.self_hosted is None and not self.apis and not self.mixes and not self.configs:
            raise ValueError("nothing to choose from: give self_hosted, apis, mixes or configs")
        return self

    def periods(self) -> list[Period]:
        """The day's periods, busiest first, one per load (a target is one period of 24 hours)."""
        hours: dict[float, float] = {}
        for p in self.forecast or [Period(load=self.target, hours=24.0)]:
            hours[p.load] = hours.get(p.load, 0.0) + p.hours
        return [Period(load=load, hours=h) for load, h in sorted(hours.items(), key=lambda item: -item[0])]


@dataclass(frozen=True)
class Candidate:
    """One deployment to size: overrides of the base workload, and the replica path the search sets."""

    index: int
    name: str
    kind: Literal["self_hosted", "api", "mix", "config"]
    overrides: tuple[str, ...]
    replicas_path: Optional[str] = None
    replicas: tuple[int, int] = (1, 1)
    scaling: str = "fixed"
    gpu: Optional[str] = None
    tensor_parallel: int = 0
    model: Optional[str] = None

    def at(self, replicas: Optional[int]) -> tuple[str, ...]:
        """The overrides with `replicas` set (when this candidate searches them)."""
        if self.replicas_path is None or replicas is None:
            return self.overrides
        return self.overrides + (override(self.replicas_path, replicas),)


@dataclass
class LoadedPlan:
    """A validated plan, its experiment form (seed, replications, workloads with overrides) and its candidates."""

    spec: Plan
    path: Path
    name: str
    experiment: LoadedExperiment
    endpoint: str
    candidates: list[Candidate]
    lines: dict

    def workload(self, candidate: Candidate, replicas: Optional[int], load: float) -> Workload:
        """The workload of `candidate` at `replicas` and `load`; ConfigError if invalid."""
        return self.experiment.workload(candidate.at(replicas) + (override(self.spec.load_axis, load),))

    @property
    def seed(self) -> int:
        return self.experiment.seed

    @property
    def replications(self) -> int:
        return self.experiment.replications


def load_plan(path: Union[str, Path]) -> LoadedPlan:
    """Load and check a plan file and its base workload; ConfigError (file:line) on any problem."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if data.get("kind") != "plan" and ("axes" in data or "variants" in data):
        raise ConfigError([f"{path}:1: this is a sweep's experiment (no `kind: plan`): run it with "
                           f"`llmsim sweep {path}`"])
    spec = validate_model(Plan, data, lines, str(path), path.parent)
    # The plan's experiment form: the same workload, seed, replications, SLO and load axis, so the sweep's
    # machinery (workloads with overrides, metric-name checks, blame on the file's lines) serves it as is.
    experiment = Experiment(workload=spec.workload, replications=spec.replications, seed=spec.seed,
                            slo=spec.slo, load_axis=spec.load_axis, name=spec.name or path.stem)
    loaded = with_base_workload(experiment, path, lines)
    base = loaded.workload()
    endpoint = _endpoint(spec, base, path, lines)
    candidates = _candidates(_Space(spec, base, loaded.base_data["models"], endpoint, path, lines))
    plan = LoadedPlan(spec, path, spec.name or path.stem, loaded, endpoint, candidates, lines)
    _check_overrides(plan)
    return plan


def _where(path: Path, lines: dict, *keys: Any) -> str:
    """'FILE:LINE: a.b' for an error about the plan's key path `keys`."""
    for k in range(len(keys), 0, -1):
        if keys[:k] in lines:
            return f"{path}:{lines[keys[:k]]}: {'.'.join(map(str, keys))}"
    return f"{path}:1: {'.'.join(map(str, keys))}"


def _endpoint(spec: Plan, base: Workload, path: Path, lines: dict) -> str:
    """The endpoint the plan provisions: named, or the only (self-hosted) one."""
    if spec.endpoint is not None:
        if spec.endpoint not in base.models:
            raise ConfigError([f"{_where(path, lines, 'endpoint')}: no model endpoint {spec.endpoint!r} in the "
                               f"workload (it has: {', '.join(base.models)})"])
        return spec.endpoint
    hosted = [n for n, m in base.models.items() if getattr(m, "kind", "") == "self_hosted"]
    choices = list(base.models) if len(base.models) == 1 else hosted
    if len(choices) != 1:
        raise ConfigError([f"{_where(path, lines, 'endpoint')}: the workload has several model endpoints "
                           f"({', '.join(base.models)}); name the one to provision"])
    return choices[0]


_HARDWARE_KEYS = ("gpu", "model", "tensor_parallel", "kv_cache_tokens")
_COEFFICIENTS = ("base_s", "per_decode_seq_s", "per_kv_token_s", "per_prefill_token_s", "per_prefill_attention_s")


def _engine_template(spec: SelfHostedSpace, raw_model: dict[str, Any]) -> dict[str, Any]:
    """The engine settings every self-hosted candidate keeps: the plan's, or the endpoint's as written in the
    workload file, less its hardware (a GPU, typed step-time coefficients, a KV capacity)."""
    if spec.engine is not None:
        return dict(spec.engine)
    raw = raw_model.get("engine") if raw_model.get("kind") == "self_hosted" else None
    if not isinstance(raw, dict):
        return {}
    kept = {k: v for k, v in raw.items() if k not in _HARDWARE_KEYS + ("step_time", "efficiency")}
    step = {k: v for k, v in (raw.get("step_time") or {}).items() if k not in _COEFFICIENTS}
    return {**kept, **({"step_time": step} if step else {})}


@dataclass(frozen=True)
class _Space:
    """What expanding a plan's candidates needs: the plan, its base workload (validated, and its models block as
    written), the endpoint provisioned, and the plan file's lines for messages."""

    spec: Plan
    base: Workload
    raw_models: dict[str, Any]
    endpoint: str
    path: Path
    lines: dict

    def where(self, *keys: Any) -> str:
        return _where(self.path, self.lines, *keys)

    @property
    def at(self) -> str:
        """The config path of the endpoint provisioned."""
        return f"models.{self.endpoint}"

    @property
    def replicas(self) -> tuple[int, int]:
        hosted = self.spec.self_hosted
        return (hosted.replicas.min, hosted.replicas.max) if hosted is not None else (1, 1)


def _candidates(space: _Space) -> list[Candidate]:
    """Every candidate, in the plan's order: GPU x TP x scaling, then the APIs, the mixes and the configs."""
    made = [*_self_hosted(space), *_apis(space), *_mixes(space), *_configs(space)]
    return [replace(c, index=k) for k, c in enumerate(made)]


def _self_hosted(space: _Space) -> Iterator[Candidate]:
    hosted, spec = space.spec.self_hosted, space.spec
    if hosted is None:
        return
    shape = _model_name(hosted, space)
    scalings = [s for s in SCALINGS if s in hosted.scaling and (s != "scheduled" or spec.forecast is not None)]
    if not scalings:
        raise ConfigError([f"{space.where('self_hosted', 'scaling')}: scheduled scaling sets replicas per forecast "
                           "period: give a forecast, or add fixed"])
    _check_policy(hosted, space.where("self_hosted", "autoscale"))
    low, high = space.replicas
    for k, name in enumerate(hosted.gpus):
        for tp in hosted.tensor_parallel:
            key, block = _hosted_block(hosted, space, name, tp, shape, space.where("self_hosted", "gpus", k))
            for scaling in scalings:
                if scaling == "autoscaled":  # the autoscaler sizes it: nothing to search
                    scaled = {**block, "replicas": low,
                              "autoscale": {**hosted.autoscale, "min_replicas": low, "max_replicas": high}}
                    yield Candidate(-1, f"{key} (TP {tp}, autoscaled {low}-{high})", "self_hosted",
                                    (override(space.at, scaled),), None, space.replicas, scaling, key, tp, shape)
                    continue
                suffix = "" if len(scalings) == 1 else f", {scaling}"
                yield Candidate(-1, f"{key} (TP {tp}{suffix})", "self_hosted", (override(space.at, block),),
                                f"{space.at}.replicas", space.replicas, scaling, key, tp, shape)


def _apis(space: _Space) -> Iterator[Candidate]:
    for name, block in space.spec.apis.items():
        yield Candidate(-1, f"API {name}", "api", (override(space.at, block),))


def _mixes(space: _Space) -> Iterator[Candidate]:
    spec, base, endpoint = space.spec, space.base, space.endpoint
    for name, mix in spec.mixes.items():
        at = space.where("mixes", name)
        _check_mix(mix, space, at)
        shape = _model_name(spec.self_hosted, space)
        key, block = _hosted_block(spec.self_hosted, space, mix.gpu, mix.tensor_parallel, shape, f"{at}.gpu")
        if mix.overflow_above is not None:
            block["queue"] = {**block.get("queue", {}), "overflow": {"to": mix.api, "above": mix.overflow_above}}
        # Every class says its endpoint: with the API beside it, the workload has two to choose from.
        routes = tuple(override(f"traffic.classes.{c}.endpoint", _split(endpoint, mix.api, mix.to_self_hosted[c])
                                if c in mix.to_self_hosted else cls.endpoint)
                       for c, cls in base.traffic.classes.items())
        # The API is a new endpoint: the models block is set whole (an override of a path that is not there yet
        # would be refused as a typo).
        models = {**space.raw_models, endpoint: block, mix.api: spec.apis[mix.api]}
        yield Candidate(-1, f"{name}: {key} (TP {mix.tensor_parallel}) + API {mix.api}", "mix",
                        (override("models", models),) + routes, f"{space.at}.replicas", space.replicas, "fixed", key,
                        mix.tensor_parallel, shape)


def _check_mix(mix: Mix, space: _Space, at: str) -> None:
    spec, base = space.spec, space.base
    if spec.self_hosted is None:
        raise ConfigError([f"{at}: a mix takes its model, replicas and prices from self_hosted: give it"])
    if mix.api not in spec.apis:
        raise ConfigError([f"{at}.api: no API {mix.api!r} under apis (there: {', '.join(spec.apis) or 'none'})"])
    if mix.api in base.models:
        raise ConfigError([f"{at}.api: the workload has a model endpoint {mix.api!r} already: rename the API"])
    if mix.to_self_hosted and base.pipeline is not None and base.pipeline.router is not None:
        raise ConfigError([f"{at}.to_self_hosted: the workload's router picks each call's endpoint, so classes "
                           "cannot be split between endpoints: use overflow_above, or write the mix out under configs"])
    unknown = [c for c in mix.to_self_hosted if c not in base.traffic.classes]
    if unknown:
        raise ConfigError([f"{at}.to_self_hosted: no class {unknown[0]!r} in the workload "
                           f"(it has: {', '.join(base.traffic.classes)})"])


def _configs(space: _Space) -> Iterator[Candidate]:
    for name, given in space.spec.configs.items():
        overrides = tuple(given) if isinstance(given, list) else tuple(override(p, v) for p, v in given.items())
        yield Candidate(-1, name, "config", overrides)


def _check_policy(hosted: SelfHostedSpace, where: str) -> None:
    """The autoscaled candidates' policy must make an autoscale block with the replica range."""
    bad = {"min_replicas", "max_replicas"} & set(hosted.autoscale)
    if bad:
        raise ConfigError([f"{where}: {sorted(bad)[0]} comes from self_hosted.replicas"])
    try:
        Autoscale.model_validate({**hosted.autoscale, "min_replicas": hosted.replicas.min,
                                  "max_replicas": hosted.replicas.max})
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError([f"{where}.{'.'.join(map(str, first['loc']))}: {first['msg']}"]) from None


def _split(hosted: str, api: str, share: float) -> Union[str, dict[str, float]]:
    """A class's endpoint: the self-hosted one, the API, or both with their shares."""
    return hosted if share == 1 else api if share == 0 else {hosted: share, api: round(1.0 - share, 12)}


def _hosted_block(hosted: SelfHostedSpace, space: _Space, gpu_name: str, tp: int, shape: str,
                  where: str) -> tuple[str, dict[str, Any]]:
    """(the GPU's catalog key, the endpoint's self_hosted block) for `gpu_name` at tensor parallelism `tp`."""
    try:
        the_gpu = gpu(gpu_name)
    except CatalogError as err:
        raise ConfigError([f"{where}: {err}"]) from None
    prices = {normalise(k): v for k, v in hosted.gpu_hourly_usd.items()}
    price = prices.get(normalise(gpu_name), the_gpu.price_usd_per_hour)
    raw_model = space.raw_models[space.endpoint]
    engine = {**_engine_template(hosted, raw_model), "gpu": the_gpu.key, "model": shape, "tensor_parallel": tp}
    return the_gpu.key, {"kind": "self_hosted", **_kept_model_fields(raw_model), "gpu_hourly_usd": price,
                         "engine": engine}


def _kept_model_fields(raw_model: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's settings that are not its hardware (queue, max_batch, prompt cache, ...), when self-hosted."""
    if raw_model.get("kind") != "self_hosted":
        return {}
    dropped = ("kind", "engine", "service_time", "gpu_hourly_usd", "replicas")
    return {k: v for k, v in raw_model.items() if k not in dropped}


def _model_name(hosted: SelfHostedSpace, space: _Space) -> str:
    """The model the self-hosted candidates serve: the plan's, or the endpoint engine's."""
    engine = getattr(space.base.models[space.endpoint], "engine", None)
    name = hosted.model or (engine.model if engine is not None else None)
    if name is None:
        raise ConfigError([f"{space.where('self_hosted', 'model')}: the endpoint {space.endpoint!r} names no "
                           "catalog model: give self_hosted.model (e.g. llama-3.1-8b)"])
    try:
        model(name, space.path.parent)
    except CatalogError as err:
        raise ConfigError([f"{space.where('self_hosted', 'model')}: {err}"]) from None
    return name


def _check_overrides(plan: LoadedPlan) -> None:
    """Every API and config candidate must make a valid workload; a bad value is a file:line error now."""
    problems = []
    load = plan.spec.periods()[0].load
    for candidate in plan.candidates:
        if candidate.kind in ("self_hosted", "mix"):
            continue  # a GPU the model does not fit is pruned, not an error (see search.bounds)
        key = ("apis", candidate.name.removeprefix("API ")) if candidate.kind == "api" else ("configs", candidate.name)
        try:
            plan.workload(candidate, None, load)
        except ConfigError as err:
            problems += [f"{_where(plan.path, plan.lines, *key)}: {line}" for line in err.lines]
    if problems:
        raise ConfigError(problems)
