"""Hyperparameters of `llm/train.py` (spec llm.md section 6, "Running it").

One dataclass, `TrainConfig`, holds every value a run depends on, each with a
default and a help text (CleanRL/nanoGPT style). A run is configured by a YAML
file and then by `key=value` overrides on the command line; dotted keys reach
into the nested sections (`kd.jsd_beta=0.9`, `dpkd.variant=ipo`,
`online.rounds=2`). Values are parsed as YAML scalars (`2`, `0.5`, `true`,
`[0, 29]`) and checked against the field's type.

Anything the code does not know -- an unknown key, an unknown objective, an
unknown choice for an enumerated field -- is refused at start with a
`ValueError` that lists the valid choices, before any model is loaded.

The objective names come from the one registry, `llm/objectives/base.py`; the
judge names are `JUDGE_NAMES` here, which `llm/judges.py` checks against its
classes when it is imported. Reading a config loads neither torch nor a model.
Adding a section: a new dataclass below and a field of `TrainConfig` whose
default is that dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm.objectives.base import DIVERGENCE_OBJECTIVES, OBJECTIVES

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "testbed.yaml"
"""The config of a plain `python llm/train.py`: the offline CPU testbed."""

DISTRIBUTED_CHOICES = ("none", "ddp", "fsdp", "deepspeed")
JUDGE_NAMES = ("bt_oracle", "rouge", "llm", "api")
"""The judges of spec section 3, by name (llm.judges.JUDGES holds their classes)."""


def _field(default: Any, help: str, choices: tuple | None = None):
    """A config field with its help text (and its valid choices, if enumerated)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class DataConfig:
    """Instruction data (spec llm.md section 4)."""

    source: str = _field(
        "testbed",
        "where the data comes from: 'testbed' (the project's generated instruction set), "
        "'files' (train/valid/test JSONL files) or 'hub' (a Hugging Face dataset; needs a hub)",
        choices=("testbed", "files", "hub"),
    )
    train_file: str = _field("", "training JSONL (source=files)")
    valid_file: str = _field("", "validation JSONL, used for checkpoint selection (source=files)")
    test_file: str = _field("", "test JSONL, evaluated at the end (source=files)")
    format: str = _field("dolly", "JSONL schema of the files", choices=("dolly", "minillm"))
    skip_malformed: bool = _field(False, "skip malformed records (their count is reported) instead of failing")
    hub_name: str = _field("databricks/databricks-dolly-15k", "dataset name (source=hub)")
    hub_valid_size: int = _field(500, "examples split off the hub train split for validation (source=hub)")
    hub_test_size: int = _field(500, "examples split off the hub train split for testing (source=hub)")
    num_train: int = _field(0, "use only the first N training examples (0 = all)")
    num_valid: int = _field(0, "use only the first N validation examples (0 = all)")
    num_test: int = _field(0, "use only the first N examples of each test set (0 = all)")
    primary_test: str = _field(
        "unseen_facts",
        "source=testbed: the test split that ranks methods, named before any method is run (spec section 5): "
        "unseen_facts (held-out facts: generalisation) or seen_facts (training facts in evaluation-only wordings)",
        choices=("unseen_facts", "seen_facts"),
    )
    max_prompt_tokens: int = _field(256, "prompts are capped at this many tokens (spec section 4)")
    max_length: int = _field(512, "prompt + response tokens of a training sequence")


@dataclass
class KDConfig:
    """Token-level distribution matching (spec llm.md section 2)."""

    prefix: str = _field(
        "gold",
        "off-policy prefix source of the token-level objectives: gold responses or cached teacher samples",
        choices=("gold", "teacher"),
    )
    on_policy_fraction: float = _field(
        0.0,
        "GKD's lambda: fraction of batches whose prefixes are sampled from the current student",
    )
    jsd_beta: float = _field(0.5, "beta of the generalised JSD: 0 is fkl, 1 is rkl")
    skl_alpha: float = _field(0.1, "alpha of skew KL, KL(p || alpha p + (1-alpha) q)")
    srkl_alpha: float = _field(0.1, "alpha of skew reverse KL, KL(q || (1-alpha) p + alpha q)")
    akl_mu: float = _field(0.5, "teacher-mass threshold mu of the adaptive KL head")
    teacher_topk: int = _field(
        0,
        "teacher top-k cache: k > 0 computes the teacher's top-k log-probs and tail mass on every fixed (gold or "
        "cached teacher) response once, under cache_dir, and the off-policy batches use them instead of running "
        "the teacher (0 = run the teacher every step)",
    )


@dataclass
class DPKDConfig:
    """Direct Preference Knowledge Distillation (spec llm.md section 2)."""

    beta: float = _field(0.1, "inverse temperature beta of the implicit reward beta log(q/p)")
    variant: str = _field("dpo", "preference loss", choices=("dpo", "ipo", "simpo", "cpo"))
    length_normalize: bool = _field(True, "divide each sequence log-ratio by its response length")
    gamma: float = _field(0.0, "target margin gamma (simpo)")
    cpo_alpha: float = _field(1.0, "weight of the NLL term of cpo")
    lambda_lm: float = _field(1.0, "weight lambda_lm of the language-modelling term on gold instruction data")


@dataclass
class PbKDConfig:
    """Preference-based KD, `pbkd` and `mm_pbkd` (spec llm.md sections 2-3; llm/objectives/preference_game.py)."""

    judge: str = _field("bt_oracle", "judge labelling the preference pairs (spec section 3)", choices=JUDGE_NAMES)
    judge_options: dict = _field({}, "keyword options of the judge, e.g. {reward_scale: 10} (bt_oracle) or {model: ...} (llm)")
    pairs_per_round: int = _field(32, "prompts labelled per round, each teacher response against every one of its "
                                      "pg.samples_per_prompt student samples (offline: the whole of D)")
    student_pairs: bool = _field(
        False, "each round also labels every pair of a prompt's pg.samples_per_prompt student samples, so the "
        "adversary learns to rank a prompt's own samples (what the leave-one-out advantage reads), not only to "
        "tell them from the teacher's response")
    offline_response: str = _field(
        "student", "offline D pairs the teacher response with the initial student's sample or the gold reference",
        choices=("student", "reference"),
    )
    rm_init: str = _field(
        "fresh", "adversary backbone: fresh (random, `rm_config` size), pruned (the teacher's `rm_layers`) or "
        "student (a copy of the run's initial student, e.g. the warm start)",
        choices=("fresh", "pruned", "student"),
    )
    rm_config: dict = _field(
        {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
        "teacher-config overrides giving the size of a fresh adversary backbone",
    )
    rm_layers: list = _field([], "teacher block indices kept by rm_init=pruned")
    reward_bound: float = _field(5.0, "B of the bounded reward r_phi = B tanh(raw/B) (pbkd)")
    q_bound: float = _field(1.0, "bound of the Q-head f_phi = B tanh(raw/B) (mm_pbkd)")
    adversary_lr: float = _field(1e-4, "AdamW learning rate of the adversary steps")
    adversary_weight_decay: float = _field(0.01, "AdamW weight decay of the adversary (its MLE warm start too)")
    timescale: str = _field(
        "refit", "the adversary's timescale (pbkd and mm_pbkd): refit (at each round start, `refit_steps` "
        "Lagrangian steps against the round's labelled student samples, then frozen for the round) or inner "
        "(`adversary_steps` Lagrangian steps on every rollout batch before the student trains on it)",
        choices=("refit", "inner"))
    refit_steps: int = _field(200, "Lagrangian steps of the per-round refit (timescale=refit)")
    adversary_steps: int = _field(1, "K_adv: adversary steps (each followed by dual ascent) per rollout batch, "
                                      "before it is scored (timescale=inner)")
    heldout_fraction: float = _field(0.1, "share of D held out of the MLE and the constraint, to report how the "
                                          "reward model generalises (pbkd)")
    mle_lr: float = _field(1e-3, "learning rate of the MLE warm start on the BT likelihood")
    mle_steps: int = _field(30, "MLE warm-start steps on D at the start of every round (gives NLL_ref)")
    bt_batch_size: int = _field(16, "preference pairs per BT-likelihood minibatch (mm_pbkd; pbkd uses all of D)")
    zeta: float = _field(1.0, "confidence radius zeta: the constraint is NLL_BT <= NLL_ref + zeta/|D|")
    lam_init: float = _field(1.0, "initial dual variable lam >= 0")
    dual_lr: float = _field(1.0, "step size of the projected dual ascent on lam")
    mm_teacher_topk: int = _field(32, "mm_pbkd: the teacher's top-k probabilities (and tail mass) wherever the "
                                      "Q-head's expectation <p, f> needs them, cached once per preference record "
                                      "(0 = the dense distribution)")
    mm_length_normalize: bool = _field(True, "mm_pbkd: divide the induced reward r_f by the response length in the "
                                             "BT link (its sum grows with the length)")
    mm_frozen_backbone: bool = _field(
        False, "mm_pbkd: freeze the Q-head's backbone and train only its vocabulary head (a copy of the output layer, "
        "untied from the embeddings), as pbkd's reward model is trained: f is linear in fixed features, which are "
        "computed once for every response of D, so the round's fit runs the head alone")
    mm_beta: float = _field(0.5, "beta mixing the off-policy (beta) and on-policy (1-beta) moments (mm_pbkd)")


REWARD_NAMES = ("answer_accuracy", "rouge_l")
"""The known rewards of the `bt_oracle` judge and of `rloo` (llm.judges.REWARDS)."""


@dataclass
class PolicyGradientConfig:
    """The student step of `rloo`, `pbkd` and the on-policy part of `mm_pbkd` (spec llm.md section 2a;
    llm/objectives/policy_gradient.py): k token-id rollouts per prompt, the reward minus beta_kl times
    the sampled KL to a frozen pi_ref, whitened leave-one-out advantages, a PPO-clipped ratio with
    token-mean normalisation over `ppo_epochs` optimiser steps per rollout batch, at its own rate."""

    samples_per_prompt: int = _field(4, "k student rollouts per prompt (leave-one-out baseline over them; >= 2)")
    lr: float = _field(1e-5, "the student's AdamW peak learning rate under these objectives, in place of optim.lr "
                             "(policy-gradient rates are one to two orders below supervised ones)")
    beta_kl: float = _field(0.05, "weight of the sampled KL(q_theta || pi_ref) subtracted from each rollout's reward")
    reference: str = _field("initial", "frozen pi_ref of the KL penalty: the run's initial student (the warm start) "
                                       "or the teacher", choices=("initial", "teacher"))
    ppo_epochs: int = _field(2, "optimiser steps on each rollout batch (a new batch is drawn every ppo_epochs steps)")
    clip_eps: float = _field(0.2, "PPO clip range of the importance ratio q_theta / q_old")
    whiten: bool = _field(True, "whiten the leave-one-out advantages over the batch (mean 0, std 1)")
    missing_eos_penalty: float = _field(1.0, "subtracted from the reward of a rollout that met no EOS (as TRL's)")
    seqkd_weight: float = _field(0.0, "weight of an optional seqkd anchor (cross-entropy on the teacher responses)")
    reward: str = _field("answer_accuracy", "rloo's known reward (the bt_oracle judge's reward of the same name)",
                         choices=REWARD_NAMES)
    reward_scale: float = _field(10.0, "rloo's reward scale (as the bt_oracle judge's reward_scale)")


@dataclass
class GenerationConfig:
    """Sampling during training (llm/rollout.py): the cached teacher responses and student rollouts."""

    max_new_tokens: int = _field(64, "longest generated response (a rollout that meets no EOS is flagged truncated)")
    temperature: float = _field(1.0, "sampling temperature of the training rollouts (no top-k, top-p or n-gram blocking)")
    batch_size: int = _field(8, "prompts per generation call")
    teacher_greedy: bool = _field(False, "generate the cached teacher responses greedily instead of sampling")


@dataclass
class OnlineConfig:
    """Rounds of a run: at the start of each round the objective refreshes what it
    generates from the current student (dpkd: the student responses for the round's
    prompts). One round = offline; rounds = max_steps = fresh samples every step."""

    rounds: int = _field(1, "number of rounds the step budget is split into")


@dataclass
class OptimConfig:
    """AdamW with warmup and a decaying schedule."""

    lr: float = _field(5e-4, "peak learning rate")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.999, "AdamW beta2")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0 = no clipping)")
    warmup_steps: int = _field(0, "linear warmup steps")
    schedule: str = _field("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = _field(0.1, "final learning rate as a fraction of the peak (cosine, linear)")


@dataclass
class EvalConfig:
    """Evaluation protocol (spec llm.md section 5)."""

    every: int = _field(50, "validate every N optimiser steps (0 = only at the end)")
    valid_seeds: list = _field([10], "sampling seeds of the periodic validation")
    test_seeds: list = _field([10, 20, 30, 40, 50], "sampling seeds of the final test evaluation")
    greedy: bool = _field(False, "greedy decoding instead of sampling at temperature 1")
    max_new_tokens: int = _field(256, "longest evaluated response")
    batch_size: int = _field(8, "prompts per evaluation generation call")
    select_by: str = _field(
        "rouge_l", "validation score that selects the best checkpoint (answer_accuracy needs a set that carries "
        "answers, as the testbed does)", choices=("answer_accuracy", "rouge_l"),
    )
    train_probe: int = _field(0, "also score the first N distinct training prompts at every validation "
                                 "(train_probe_<metric> in the valid log; never used to select): what the "
                                 "policy-gradient objectives train on, measured; 0 = off")
    test: bool = _field(True, "evaluate the best checkpoint on the test sets at the end")
    before: bool = _field(True, "evaluate the student before training")
    teacher: bool = _field(True, "evaluate the teacher on the test set (cached per teacher, data and protocol)")


@dataclass
class TeacherSFTConfig:
    """The teacher fine-tuned on the task's training split first, as the papers do (spec llm.md section 5)."""

    steps: int = _field(0, "sft steps of the teacher on the training split before distilling (0 = the teacher as "
                           "given); built once under cache_dir/teacher_sft and reused")
    lr: float = _field(5e-5, "peak learning rate of the teacher's sft (cosine, 10% warmup)")


@dataclass
class TrainConfig:
    """Everything `llm/train.py` needs; see each field's help text."""

    run_name: str = _field("testbed", "name of the run; outputs go to <out_dir>/<run_name>")
    out_dir: str = _field("runs", "parent folder of the run folders")
    cache_dir: str = _field("cache", "folder of cached teacher responses and evaluations")
    seed: int = _field(0, "seed of data order, initialisation and sampling")

    teacher: str = _field(
        "smollm2-135m-instruct",
        "teacher: a hub name, a local folder, or 'smollm2-135m-instruct' (the offline SmolLM2-135M-Instruct)",
    )
    teacher_sft: TeacherSFTConfig = _section(TeacherSFTConfig, "the teacher's fine-tune on the training split")
    teacher_dtype: str = _field(
        "auto", "teacher weights dtype; auto = bfloat16 on GPU, float32 on CPU",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    student: str = _field("", "student hub name or local folder (student_init=pretrained)")
    student_init: str = _field(
        "pruned",
        "pretrained: load `student`; pruned: keep `student_layers` of the teacher; "
        "fresh: random init of the teacher's config with `student_config` overrides",
        choices=("pretrained", "pruned", "fresh"),
    )
    student_layers: list = _field([0, 6, 12, 17, 23, 29], "teacher layer indices kept by student_init=pruned")
    student_config: dict = _field({}, "teacher-config overrides for student_init=fresh, e.g. {num_hidden_layers: 4}")
    trust_remote_code: bool = _field(False, "allow model code from the hub (only if the model needs it)")

    objective: str = _field("fkl", "training objective (spec llm.md section 2)", choices=OBJECTIVES)
    kd: KDConfig = _section(KDConfig, "token-level distribution matching")
    dpkd: DPKDConfig = _section(DPKDConfig, "DPKD")
    pbkd: PbKDConfig = _section(PbKDConfig, "PbKD and MM PbKD")
    pg: PolicyGradientConfig = _section(PolicyGradientConfig, "the policy-gradient student step")
    online: OnlineConfig = _section(OnlineConfig, "rounds")
    data: DataConfig = _section(DataConfig, "data")
    generation: GenerationConfig = _section(GenerationConfig, "sampling during training")
    optim: OptimConfig = _section(OptimConfig, "optimiser")
    eval: EvalConfig = _section(EvalConfig, "evaluation")

    batch_size: int = _field(8, "sequences per optimiser step, summed over processes and accumulation")
    grad_accum: int = _field(1, "gradient accumulation steps; micro-batch = batch_size / (processes * grad_accum)")
    max_steps: int = _field(200, "optimiser steps of the run")
    loss_chunk_tokens: int = _field(
        1024, "response tokens per chunk of the LM head and the token-level losses: peak memory holds one chunk's "
        "(tokens, vocabulary) tensors (0 = every token of a micro-batch at once)",
    )
    log_every: int = _field(10, "log metrics every N steps")
    save_every: int = _field(50, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _field(1, "resumable checkpoints kept besides the best one")
    stop_after: int = _field(0, "stop this invocation after N steps, checkpointing first (0 = run to max_steps)")

    distributed: str = _field(
        "none", "multi-process engine under torchrun (through accelerate)", choices=DISTRIBUTED_CHOICES
    )
    deepspeed_stage: int = _field(2, "ZeRO stage for distributed=deepspeed", choices=(1, 2, 3))
    mixed_precision: str = _field(
        "auto", "auto = bf16 autocast on GPU, fp32 on CPU", choices=("auto", "no", "bf16", "fp16")
    )
    cpu: bool = _field(False, "force the CPU even when a GPU is present")
    num_threads: int = _field(0, "torch CPU threads (0 = torch's default)")


# ----------------------------------------------------------------------------
# Loading, overriding, validating


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(path: str, value: Any, tp, choices):
    """Coerce a parsed value to the field's type, or say what was expected."""
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"config key '{path}' is a section; set its keys ({path}.KEY=VALUE)")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, float),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }[tp]
    if not ok:
        raise ValueError(
            f"config key '{path}' expects a {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    if choices is not None and value not in choices:
        raise ValueError(f"config key '{path}' = {value!r} is not a valid choice; valid choices: {list(choices)}")
    return value


def _apply(section, values: dict, prefix: str = "") -> None:
    """Set the entries of a (nested) dict on a dataclass instance, refusing unknown keys."""
    if not isinstance(values, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        path = prefix + str(key)
        if key not in fields:
            raise ValueError(
                f"unknown config key '{path}'; valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: "
                f"{sorted(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(section, key), value, path + ".")
        else:
            setattr(section, key, _check_value(path, value, tp, fields[key].metadata.get("choices")))


def _nest(dotted_key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted_key.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value parsed as a YAML scalar or flow collection."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. objective=rkl, kd.jsd_beta=0.9)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key, value


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no model or data; raise ValueError on the first problem."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError(f"batch_size ({cfg.batch_size}) and grad_accum ({cfg.grad_accum}) must be >= 1")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of grad_accum ({cfg.grad_accum})")
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if not 0.0 <= cfg.kd.on_policy_fraction <= 1.0:
        raise ValueError(f"kd.on_policy_fraction (GKD lambda) must lie in [0, 1], got {cfg.kd.on_policy_fraction}")
    if not 0.0 <= cfg.kd.jsd_beta <= 1.0:
        raise ValueError(f"kd.jsd_beta must lie in [0, 1], got {cfg.kd.jsd_beta}")
    for name in ("skl_alpha", "srkl_alpha", "akl_mu"):
        if not 0.0 <= getattr(cfg.kd, name) <= 1.0:
            raise ValueError(f"kd.{name} must lie in [0, 1], got {getattr(cfg.kd, name)}")
    if cfg.kd.teacher_topk < 0 or cfg.loss_chunk_tokens < 0:
        raise ValueError(f"kd.teacher_topk ({cfg.kd.teacher_topk}) and loss_chunk_tokens ({cfg.loss_chunk_tokens}) "
                         "must be >= 0")
    if cfg.kd.teacher_topk and (cfg.objective not in DIVERGENCE_OBJECTIVES or cfg.kd.on_policy_fraction == 1.0):
        raise ValueError(f"kd.teacher_topk caches the teacher on fixed responses, for the off-policy batches of "
                         f"{', '.join(DIVERGENCE_OBJECTIVES)}; objective={cfg.objective} with kd.on_policy_fraction="
                         f"{cfg.kd.on_policy_fraction} has none (set kd.teacher_topk=0)")
    if cfg.online.rounds < 1 or cfg.online.rounds > cfg.max_steps:
        raise ValueError(f"online.rounds must lie in [1, max_steps={cfg.max_steps}], got {cfg.online.rounds}")
    if cfg.student_init == "pretrained" and not cfg.student:
        raise ValueError("student_init=pretrained needs student=<hub name or folder>; or use student_init=pruned|fresh")
    if cfg.student_init == "pruned" and not cfg.student_layers:
        raise ValueError("student_init=pruned needs student_layers=[i, j, ...] (teacher layer indices to keep)")
    if cfg.data.source == "files":
        missing = [k for k in ("train_file", "valid_file", "test_file") if not getattr(cfg.data, k)]
        if missing:
            raise ValueError(f"data.source=files needs {', '.join('data.' + k for k in missing)}")
    if cfg.generation.temperature <= 0 or cfg.generation.max_new_tokens < 1:
        raise ValueError("generation.temperature must be > 0 and generation.max_new_tokens >= 1 "
                         f"(for greedy teacher responses set generation.teacher_greedy=true); got {cfg.generation}")
    if not cfg.eval.valid_seeds or not cfg.eval.test_seeds:
        raise ValueError("eval.valid_seeds and eval.test_seeds must name at least one seed each")
    p = cfg.pbkd
    if p.pairs_per_round < 1 or p.bt_batch_size < 1 or p.adversary_steps < 0 or p.mle_steps < 0:
        raise ValueError("pbkd needs pairs_per_round >= 1, bt_batch_size >= 1 and "
                         f"adversary_steps, mle_steps >= 0; got {p}")
    if min(p.zeta, p.lam_init, p.dual_lr, p.adversary_weight_decay, p.refit_steps) < 0 or not 0.0 <= p.mm_beta <= 1.0:
        raise ValueError("pbkd.zeta, lam_init, dual_lr, adversary_weight_decay, refit_steps must be >= 0 and "
                         "pbkd.mm_beta in [0, 1]")
    if p.mm_teacher_topk < 0:
        raise ValueError(f"pbkd.mm_teacher_topk must be >= 0 (0 = dense), got {p.mm_teacher_topk}")
    if not 0.0 <= p.heldout_fraction < 0.5:
        raise ValueError(f"pbkd.heldout_fraction must lie in [0, 0.5), got {p.heldout_fraction}")
    g = cfg.pg
    if g.samples_per_prompt < 2 or g.ppo_epochs < 1 or not 0 < g.clip_eps < 1:
        raise ValueError(f"pg needs samples_per_prompt >= 2 (leave-one-out baseline), ppo_epochs >= 1 and clip_eps "
                         f"in (0, 1); got samples_per_prompt={g.samples_per_prompt}, ppo_epochs={g.ppo_epochs}, "
                         f"clip_eps={g.clip_eps}")
    if g.lr <= 0 or min(g.beta_kl, g.missing_eos_penalty, g.seqkd_weight) < 0 or g.reward_scale <= 0:
        raise ValueError(f"pg.lr and pg.reward_scale must be > 0 and pg.beta_kl, missing_eos_penalty, seqkd_weight "
                         f">= 0; got {g}")
    if p.rm_init == "pruned" and cfg.objective in ("pbkd", "mm_pbkd") and not p.rm_layers:
        raise ValueError("pbkd.rm_init=pruned needs pbkd.rm_layers=[i, j, ...] (teacher block indices to keep)")
    if cfg.stop_after < 0:
        raise ValueError(f"stop_after must be >= 0, got {cfg.stop_after}")
    if cfg.teacher_sft.steps < 0 or cfg.teacher_sft.lr <= 0:
        raise ValueError(f"teacher_sft.steps must be >= 0 and teacher_sft.lr > 0, got {cfg.teacher_sft}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated.

    Raises ValueError for an unknown key, a wrong type or an invalid choice,
    naming the key and the valid choices.
    """
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        _apply(cfg, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """The config as a plain nested dict (for logging and the checkpoint)."""
    return dataclasses.asdict(cfg)


def section_names() -> list[str]:
    """The config's sections (`kd`, `dpkd`, ...), whose keys are set as `SECTION.KEY=VALUE`."""
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(hints[f.name])]


def help_text(cls=TrainConfig, prefix: str = "") -> str:
    """One line per key: dotted name, default, choices and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(help_text(tp, prefix + f.name + "."))
            continue
        choices = f.metadata.get("choices")
        extra = f" {{{'|'.join(map(str, choices))}}}" if choices else ""
        lines.append(f"  {prefix}{f.name}={getattr(defaults, f.name)!r}{extra}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


__all__ = [
    "OBJECTIVES",
    "JUDGE_NAMES",
    "DEFAULT_CONFIG",
    "DISTRIBUTED_CHOICES",
    "TrainConfig",
    "DataConfig",
    "KDConfig",
    "DPKDConfig",
    "PbKDConfig",
    "GenerationConfig",
    "OnlineConfig",
    "OptimConfig",
    "EvalConfig",
    "load_config",
    "parse_override",
    "validate",
    "to_dict",
    "help_text",
    "section_names",
]
