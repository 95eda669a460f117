"""Configuration of every stage: dataclasses, YAML loading and dotted overrides.

Unknown keys are errors that list the valid ones, so a typo in a YAML file never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


@dataclass
class CorpusConfig:
    """Where the SFT corpus is and how its columns are named.

    ``path`` is a JSONL or Parquet file, a folder of shards, a ``datasets.save_to_disk``
    directory, or any pyarrow filesystem URI (``s3://...``). Empty: the built-in demo corpus.
    ``messages`` names a chat column (list of {role, content}; a ShareGPT ``conversations`` column
    of {from, value} is read too), used for rows without a prompt column: every assistant turn
    is trained on. Rows with an empty prompt or response, a repeated id, or no response token
    left after truncation are dropped and counted; ``strict`` makes each of them an error.
    """

    path: str = ""
    format: str = "auto"  # auto | jsonl | parquet | hf
    id: str = "id"
    prompt: str = "prompt"
    response: str = "response"
    source: str = "source"
    messages: str = "messages"
    default_source: str = "default"
    strict: bool = False
    part_rows: int = 8192  # rows per stored corpus part (the unit of scoring)
    piece_mb: float = 32.0  # input read by one ingest task (JSONL bytes, Parquet uncompressed row groups)


@dataclass
class DemoConfig:
    """The built-in multi-source maths corpus generated with reasoning-gym."""

    sources: list[str] = field(default_factory=lambda: [
        "gsm_symbolic", "basic_arithmetic", "chain_sum", "fraction_simplification",
        "gcd", "lcm", "simple_equations", "base_conversion", "prime_factorization",
        "decimal_arithmetic",
    ])
    train_per_source: int = 200
    train_sizes: list[int] = field(default_factory=list)  # per source, aligned with sources; empty: train_per_source
    eval_per_source: int = 25
    # target.jsonl: examples of the user's task for target-aware selection (--target), from generator seeds
    # twenty million apart from the training items (and ten million from the evaluation's); empty: the first source
    target_sources: list[str] = field(default_factory=list)
    target_per_source: int = 50
    target_eval_per_source: int = 100  # eval_target.jsonl: held-out items of target_sources (one-task evaluation)
    seed: int = 1234
    vocab_size: int = 2048
    # per source, the reasoning-gym generator's own config ({"gcd": {"max_value": 100}}); unnamed: its defaults.
    # The benchmark's bases pretrain on these generators with the same settings.
    generator_args: dict[str, dict] = field(default_factory=dict)
    split_digits: bool = False  # the tokenizer keeps every digit a token of its own (models can learn arithmetic)


@dataclass
class TextConfig:
    """Prompt template and tokenisation."""

    template: str = "Question: {prompt}\nAnswer: "  # prompt/response rows
    chat_template: str = ""  # chat rows: empty: the tokenizer's own; "plain": the template's wording; a .jinja file
    max_length: int = 512
    tokenizer: str = ""  # local tokenizer dir; empty: the proxy model's dir, else one trained on the corpus
    vocab_size: int = 8192  # the BPE tokenizer trained on the corpus when no tokenizer or proxy model is given
    train_on_prompt: bool = False  # labels on every token (the prompt too): language modelling, as in pretraining


@dataclass
class Placement:
    """Where a stage's Ray workers (or actors) run, and how many: the one shape of the proxy's workers, the scoring
    actors, fine-tuning's workers and evaluation's actors."""

    count: int = 1
    cpus: float = 1.0  # logical CPUs each reserves; torch threads = max(1, int(this))
    gpus: float = 1.0  # used only on GPU; below 1 shares a GPU
    resources: list[str] = field(default_factory=list)  # custom Ray resources each, NAME=AMOUNT (pinning to nodes)

    def ray_resources(self, gpu: bool, where: str) -> dict[str, float]:
        """What each asks Ray for: its CPUs, its GPUs when on GPU, its custom resources (checked, named by ``where``)."""
        return {"CPU": self.cpus} | ({"GPU": self.gpus} if gpu else {}) | parse_resources(self.resources,
                                                                                        f"{where}.resources")


@dataclass
class ProxyConfig:
    """The small proxy model and its Ray Train fine-tuning run."""

    model: str = ""  # local model dir; empty: build the tiny preset below
    preset: str = "tiny"  # tiny | small (see models.PRESETS)
    seed: int = 0  # a fresh model's initialisation and the training order (part of the trajectories' key)
    epochs: int = 3
    lr: float = 2e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 16  # rows per worker and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # 0: no clipping
    max_failures: int = 3  # worker-group restarts from the last trajectory point's checkpoint
    packed: bool = False  # rows of a batch concatenated without padding (same loss; text.pack), else right-padded
    num_points: int = 12  # T: trajectory points spread evenly over training
    # your own checkpoints instead of training a proxy (--checkpoints): model dirs, or a training output whose
    # checkpoint-N folders are used in step order; local paths or URIs. Each is a trajectory point (num_points follows)
    checkpoints: list[str] = field(default_factory=list)
    # or the official S2L code's losses.pt files (--losses): files, checkpoint folders holding one, or a training
    # output whose checkpoint-N folders do; losses per example in the order of the corpus's inputs (num_points follows)
    losses: list[str] = field(default_factory=list)
    use_gpu: str = "auto"  # auto | true | false
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # Ray Train workers (count: part of the trajectories' key, it fixes the training order); gpus below 1 would put
    # two ranks on one GPU, which NCCL refuses
    workers: Placement = field(default_factory=lambda: Placement(count=2, cpus=1.0, gpus=1.0))


@dataclass
class ScoringConfig:
    """The Ray Data batch-scoring job run at every trajectory point."""

    max_tokens: int = 8192  # padded tokens in one forward pass
    # Ray Data actors; on GPU (as the proxy runs) a quarter GPU each, beside the proxy's workers when they leave room
    actors: Placement = field(default_factory=lambda: Placement(count=1, cpus=0.5, gpus=0.25))


@dataclass
class ClusterConfig:
    """K-means on the loss trajectories."""

    backend: str = "auto"  # auto (cuml on GPU, else faiss) | faiss | cuml
    k: int = 100
    niter: int = 20
    max_points_per_centroid: int = 256  # fit on at most k * this many sampled points
    per_source: bool = False
    # how per-source methods split the budget over sources: equal (the official code), proportional (by corpus
    # share), target (by the target examples' mix); auto: the method's own (equal for s2l and
    # random-per-source, target for s2l-target and random-target-sources)
    source_split: str = "auto"
    nan_value: float = 0.0
    keep_every: int = 1


@dataclass
class SelectConfig:
    """Which method picks the subset, and how large it is."""

    method: str = "s2l"
    budgets: list[float] = field(default_factory=lambda: [0.1])  # counts (>=1) or fractions (<1)
    # a few hundred examples of the user's target task (any corpus format, read with the corpus's column
    # settings), never trained on: scored at every trajectory point like the corpus, for target-aware methods
    target: str = ""
    target_smoothing: float = 0.1  # share of the weight spread evenly over clusters/sources (0: target alone)
    embedding_rank: str = "nearest"  # embedding-target: nearest (max cosine over target examples) | mean


@dataclass
class TrackingConfig:
    """Experiment tracking of a job (``tracking``), through Ray's MLflow and W&B integrations."""

    backend: str = "none"  # none | mlflow | wandb
    project: str = "s2l-ray"  # MLflow experiment / W&B project
    uri: str = ""  # MLflow tracking URI (empty: MLFLOW_TRACKING_URI); W&B: the local folder of its files
    run_name: str = ""  # empty: the job's output folder's name


@dataclass
class S2LConfig:
    """A whole selection run."""

    output: str = "runs/demo"
    seed: int = 0  # the selection's: k-means and sampling (proxy.seed drives the proxy)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class FinetuneConfig:
    """Fine-tuning the target on the selected subset: DeepSpeed ZeRO inside Ray Train.

    ``corpus.path`` is a selection run directory (its ``selected.jsonl``, or
    ``selected-<budget>.jsonl`` when it holds several budgets) or any corpus path; the other
    ``corpus`` fields map its columns. Values ``"auto"`` in the DeepSpeed JSON are filled from
    the fields below.
    """

    output: str = "runs/demo-target"
    model: str = ""  # local HF model dir; empty: a fresh `preset` model with the demo tokenizer
    preset: str = "small"  # see models.PRESETS
    budget: int = 0  # which selected-<budget>.jsonl of a run dir holding several; 0: its selected.jsonl
    seed: int = 0
    epochs: int = 3
    lr: float = 2e-5  # for a pretrained model; the demo's from-scratch target uses configs/finetune_demo.yaml
    schedule: str = "cosine"  # cosine | linear | constant_with_warmup (transformers.get_scheduler names)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    micro_batch_size: int = 8  # rows per worker per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # 0: no clipping
    checkpoint_every: int = 50  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    zero_stage: int = 2  # 1 | 2 | 3
    deepspeed_config: str = ""  # DeepSpeed JSON; empty: configs/ds_zero<zero_stage>.json
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states in CPU memory
    use_gpu: str = "auto"  # auto | true | false
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    workers: Placement = field(default_factory=lambda: Placement(count=2, cpus=1.0, gpus=1.0))  # Ray Train workers
    length_window: int = 1  # >1: rows grouped by length within windows of this many micro-batches (less padding)
    packed: bool = False  # rows of a micro-batch concatenated without padding (same loss; text.pack), else padded
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(path="runs/demo"))
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class EvaluateConfig:
    """Greedy generation and exact-match scoring of a model on an evaluation set.

    ``corpus.path`` is the evaluation set (empty: the demo's ``eval.jsonl``): rows as in a training
    corpus (prompt/response, GSM8K question/answer, MATH problem/solution, or chat messages), with
    optionally a source and a gold answer column (else read from the response). Use the
    fine-tuning run's ``text``.
    """

    model: str = "runs/demo-target"  # HF model dir, or a fine-tuning output dir holding model/
    output: str = ""  # empty: <fine-tuning output>/eval, or <model>/eval for a plain model dir
    answer: str = "answer"  # gold answer column (optional in the data; read after "####", in \\boxed{}, ...)
    chat: bool = False  # prompt prompt/response rows too through the chat template, as one-turn conversations
    ordered_lists: bool = False  # comma-list answers match only in the same order (sorting, reversal tasks)
    stop: list[str] = field(default_factory=list)  # generation stops at these too; empty: the template's "Question:"
    max_new_tokens: int = 256
    limit: int = 0  # evaluate the first N rows only; 0: all
    batch_size: int = 32  # rows per generate() call
    # Ray Data actors (cpus fractional, so that read tasks still get a CPU)
    actors: Placement = field(default_factory=lambda: Placement(count=2, cpus=0.5, gpus=1.0))
    use_gpu: str = "auto"  # auto | true | false
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class BasesConfig:
    """Pretrained bases for the benchmark: a proxy and a target pretrained once (language modelling of
    whole texts) on a broad maths mixture of reasoning-gym generators, from seeds far from every
    fine-tuning and evaluation item; every cell then fine-tunes them."""

    enabled: bool = False
    output: str = ""  # where the bases are kept; empty: <benchmark output>/bases (share one folder between outputs)
    sources: list[str] = field(default_factory=lambda: [
        "gsm_symbolic", "basic_arithmetic", "chain_sum", "fraction_simplification", "gcd", "lcm", "simple_equations",
        "base_conversion", "prime_factorization", "decimal_arithmetic", "leg_counting", "power_function",
        "count_bits", "number_sorting", "time_intervals", "products", "bitwise_arithmetic", "decimal_chain_sum",
        "complex_arithmetic", "count_primes", "calendar_arithmetic"])
    rows_per_source: int = 400
    seed: int = 50_000_000  # item i of source k uses Random(seed + k * 1,000,003 + i): far from the demo's
    proxy_preset: str = "tiny"
    target_preset: str = "medium"  # "": no target base (the benchmark's finetune.model is used)
    epochs: int = 2
    lr: float = 1e-3
    micro_batch_size: int = 16
    max_length: int = 256
    length_window: int = 1  # as finetune.length_window: >1 groups texts of similar length (less padding)


@dataclass
class BenchmarkConfig:
    """Selection methods side by side: one selection run (proxy, trajectories, clusters), then a
    target fine-tuned and evaluated for every method, budget and seed.

    ``selection``, ``finetune`` and ``evaluate`` are the stages' own configs; the benchmark sets
    their outputs, data paths, method, budget and seed. With no ``selection.corpus.path`` the
    demo mixture is built under ``<output>/data`` and its held-out split is the evaluation set.
    """

    output: str = "runs/benchmark"
    methods: list[str] = field(default_factory=lambda: [
        "s2l", "random", "perplexity-low", "perplexity-middle", "perplexity-high", "confidence",
        "variability", "learnability"])
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.3])  # counts (>=1) or fractions (<1)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    full: bool = True  # also fine-tune on every example
    base: bool = False  # also evaluate the target without fine-tuning (finetune.model or the target base)
    global_k: int = 0  # k of the one global k-means behind method "s2l-global"; 0: cluster.k x the sources
    # a one-task evaluation set besides evaluate.corpus.path (the target task; never the target examples)
    target_eval: str = ""
    demo_train: str = "train"  # with the demo mixture: its training file, train | train_chat (conversations)
    demo_eval: str = "eval"  # and its evaluation file, eval | eval_gsm8k (gsm_symbolic in GSM8K's own schema)
    # and its target examples as selection.select.target: "" (none) | target | target_chat; with them, its
    # held-out items of demo.target_sources (eval_target.jsonl) are the one-task evaluation set
    demo_target: str = ""
    bases: BasesConfig = field(default_factory=BasesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the benchmark's own run: results and ledger
    selection: S2LConfig = field(default_factory=S2LConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def parse_resources(items: list[str], where: str) -> dict[str, float]:
    """Custom Ray resources from ``NAME=AMOUNT`` strings (``["node2=0.01"]``): what a stage's workers or
    actors request besides CPUs and GPUs, to pin them to the nodes that have them."""
    out = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out[name.strip()] <= 0:
            raise ConfigError(f"{where}: expected NAME=AMOUNT with AMOUNT > 0, got {item!r}")
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError(f"{where}: expected a mapping of mappings, got {value!r}")
        return {str(k): dict(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:  # YAML reads `use_gpu: true` as a boolean
            return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming the valid ones. A mapping for a
    nested config overlays that field's own default (``scoring: {actors: {count: 4}}`` keeps the actors' cpus)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {list(fields)}")
    out = {}
    for k, v in data.items():
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            v = {**to_dict(f.default_factory()), **v}
        out[k] = _coerce(v, hints[k], f"{where}.{k}")
    return cls(**out)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: S2LConfig, overrides: dict[str, Any]) -> S2LConfig:
    """Return a copy of ``cfg`` with dotted keys (``proxy.epochs``) set; ``None`` values are skipped."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown config section {p!r} in {dotted!r}; valid: {sorted(data)}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown key {dotted!r}; valid keys: {sorted(node)}")
        node[leaf] = value
    return from_dict(type(cfg), data)


def parse_sets(items: list[str]) -> dict[str, str]:
    """Overrides from ``--set KEY=VALUE`` flags."""
    out = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        out[key.strip()] = value
    return out


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                cls: type = S2LConfig) -> Any:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = from_dict(cls, data, where=str(path) if path else "config")
    return apply_overrides(cfg, overrides or {})
