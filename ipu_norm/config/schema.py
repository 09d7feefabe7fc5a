"""The one configuration schema of the training application: typed dataclasses, one per YAML section.

Every YAML file, every ``--set key=value`` and every dedicated CLI flag is validated against these
classes (see ``loader.py``): unknown keys and wrong types are errors naming the file and the dotted key.
Field defaults here are the defaults of a config that does not mention the key; ``configs/base.yml``
holds the shared recipe defaults on top of them.

Learning rate convention: ``optim.lr`` is the learning rate *per ``optim.lr_reference_batch`` samples*
(256 by default); the optimizer gets ``lr * global_batch_size / lr_reference_batch`` (linear scaling
rule, as in the NFNet and EfficientNet recipes). Set ``lr_reference_batch: null`` to make ``lr`` absolute.
``optim.min_lr`` is absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DeviceName = Literal["auto", "cpu", "cuda", "ipu"]
# '16.32' = fp16 compute with fp32 master weights / accumulators, '16.16' = fp16 throughout (IPU);
# on CUDA both mean autocast fp16 + GradScaler (PyTorch AMP keeps fp32 master weights). 'bf16' = bfloat16
# autocast (CUDA or CPU), no loss scaling needed.
Precision = Literal["32.32", "16.32", "16.16", "bf16"]


@dataclass
class ModelConfig:
    """Which network to build (``ipu_norm.models.create_model``)."""

    name: str = "resnet50"
    # Norm string for ipu_norm.layers.parse_norm ('bn', 'gn', 'ln', 'gn+pn', 'ln+pn', 'none');
    # null = the model's own default (NF models have no norm and must leave it null).
    norm: str | None = None
    norm_groups: int | None = None  # GroupNorm groups for 'gn'/'gn+pn'; null = layer default (4)
    num_classes: int = 1000
    drop_rate: float | None = None  # dropout before the classifier; null = model default
    drop_path_rate: float | None = None  # stochastic depth; null = model default
    zero_init_last: bool | None = None  # zero-init the last norm/gain of each residual branch; null = default
    # Extra keyword arguments for the model builder (architecture knobs such as ResNet `widths` /
    # `stem_width` for tiny test models); checked against the builder's signature when the model is built.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Datasets and input pipeline (``ipu_norm.data``)."""

    # generated: random images/labels made on the fly (no download; throughput checks, smoke runs);
    # imagefolder: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``;
    # digits: sklearn's 8x8 handwritten digits exported to an ImageFolder under ``root`` (small real data).
    dataset: Literal["generated", "imagefolder", "digits"] = "generated"
    root: str | None = None
    train_size: int | None = None  # training image side; null = model default_cfg['train_size']
    test_size: int | None = None  # validation image side; null = model default_cfg['test_size']
    num_workers: int = 2
    # How DataLoader workers start: fork, spawn or forkserver; null = the platform's default (fork on Linux).
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    generated_samples: int = 1024  # size of the generated training set (validation: generated_val_samples)
    generated_val_samples: int = 256
    digits_image_size: int = 32  # side of the exported digits images (upsampled from 8x8)
    val_batch_size: int | None = None  # null = train.micro_batch_size
    # false: training images get the evaluation transform (resize + centre crop at train_size, no flip), as in the
    # fine-tuning stage at test resolution (the `finetune` section sets it for that stage).
    train_augment: bool = True


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and Adaptive Gradient Clipping."""

    # rmsprop_tf: TensorFlow's RMSprop (ipu_norm.optim.rmsprop_tf; poptorch.optim.RMSprop(use_tf_variant=True)):
    # mean square starts at 1, eps inside the square root, lr inside the momentum buffer.
    name: Literal["sgd", "rmsprop", "adamw", "rmsprop_tf"] = "sgd"
    lr: float = 0.1  # per lr_reference_batch samples (see module docstring)
    lr_reference_batch: int | None = 256  # null = lr is absolute
    momentum: float = 0.9  # SGD / RMSprop momentum
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0  # applied to conv/linear weights and PN proxy params only
    eps: float | None = None  # null = optimizer default (RMSprop 1e-8, AdamW 1e-8, rmsprop_tf 1e-10 as TF1)
    alpha: float = 0.9  # RMSprop / rmsprop_tf decay of the mean square (PyTorch default 0.99; TF's rho 0.9)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    agc_clip: float | None = None  # Adaptive Gradient Clipping factor lambda; null = off
    agc_eps: float = 1e-3
    # step: exact AGC on the accumulated, all-reduced gradient (CPU/GPU); micro_batch: each micro-batch's gradient
    # of the Scaled-WS convs clipped in the backward pass (the IPU's only option; ipu_norm.optim.agc_scope).
    agc_scope: Literal["step", "micro_batch"] = "step"
    # exponential: smooth decay_rate ** (epochs / decay_epochs); step: staircase (EfficientNet's x0.97 / 2.4 ep)
    schedule: Literal["cosine", "exponential", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup from 0, per optimizer step
    decay_rate: float = 0.97  # exponential / step: lr *= decay_rate every decay_epochs epochs
    decay_epochs: float = 2.4
    min_lr: float = 0.0  # absolute floor of the cosine / exponential schedule


@dataclass
class TrainConfig:
    """Training loop: batch sizes, regularisation, EMA, logging and checkpoints."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still uses epochs)
    micro_batch_size: int = 8  # samples per forward/backward pass on one device
    # samples per optimizer step, over all data-parallel workers; null = micro_batch_size x
    # gradient_accumulation x data-parallel size. Determines gradient accumulation when that is null.
    global_batch_size: int | None = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    ema_decay: float | None = None  # null = no EMA
    ema_warmup: bool = True
    # After training, average the weights of the saved checkpoints (Graphcore's recipe, ipu_norm.train.weight_avg):
    # 'exponential' (avg = decay * avg + (1 - decay) * ckpt, oldest first) or 'mean'; saved as
    # checkpoints/averaged_step<N>.pt, validated once (metrics avg_top1 ...) and used by the fine-tuning stage.
    weight_avg_strategy: Literal["none", "mean", "exponential"] = "none"
    weight_avg_exp_decay: float = 0.97
    weight_avg_N: int | None = None  # the last N saved checkpoints; null = all kept (train.keep_checkpoints)
    val_every_epochs: int = 1  # 0 = validate only at the end
    log_every_steps: int = 10
    checkpoint_every_steps: int | None = None  # null = at the end of every epoch (and at the end)
    keep_checkpoints: int = 3
    seed: int = 0
    output_dir: str = "runs/default"  # one run per directory (see ipu_norm/train/run_dir.py)
    tensorboard: bool = True  # event files in <output_dir>/tb (needs the tensorboard package)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works)
    wandb_project: str = "ipu_norm"
    deterministic: bool = False
    progress_bar: bool = True
    # Stop (with an error, checkpoints kept) after this many optimizer steps in a row whose loss was non-finite or
    # whose update was skipped for inf/nan gradients; null = never stop. A few skips are normal with fp16 loss
    # scaling (the GradScaler halves its scale from 2^16 on each overflow), so keep this above ~20.
    max_nonfinite_steps: int | None = 25


@dataclass
class ExecutionConfig:
    """Where and how the model runs: device, precision, replication and the IPU execution plan."""

    device: DeviceName = "auto"
    precision: Precision = "32.32"
    replicas: int = 1  # IPU data-parallel replicas (on CPU/GPU: the torchrun world size decides)
    gradient_accumulation: int | None = None  # null = derived from train.global_batch_size
    device_iterations: int = 1  # IPU: optimizer steps per host call
    ipus_per_replica: int = 1
    pipeline_splits: list[str] = field(default_factory=list)  # module names starting a new stage: 'blocks.7'
    pipeline_schedule: Literal["gpipe", "1f1b"] = "gpipe"
    # none | auto (PopTorch's default mode: pipeline when pipelined, standard on one IPU) | standard | recompute_all |
    # pipeline | checkpoints (manual, recompute_checkpoints); see ipu_norm/core/plan.py
    recompute: Literal["none", "auto", "standard", "recompute_all", "pipeline", "checkpoints"] = "none"
    recompute_checkpoints: list[str] = field(default_factory=list)  # module names whose outputs are kept
    available_memory_proportion: float | list[float] | None = None  # one value or one per IPU
    stochastic_rounding: bool = True
    loss_scaling: str | float = "auto"  # 'auto' or a fixed loss scale
    optimizer_state_offchip: bool = False
    replicated_tensor_sharding: bool = False
    executable_cache_dir: str | None = None
    # IPU: the per-stage memory estimate (ipu_norm.memory) runs before compilation; a predicted overflow of the
    # 900 MB In-Processor-Memory is an error (default), a warning, or not checked.
    memory_check: Literal["error", "warn", "off"] = "error"
    ipu_model: bool = False  # run on the Poplar IPU Model (CPU emulation) instead of hardware
    compile: bool = False  # torch.compile the model on CPU/GPU


@dataclass
class FinetuneConfig:
    """The last stage of half-resolution training: a few epochs at the test resolution (``ipu_norm.train.finetune``).

    Starts from the finished run's last checkpoint (its EMA weights when it has them), trains with the
    evaluation transform at ``image_size`` (no mixup/cutmix, no EMA), the layers before ``first_trainable``
    frozen, and writes its own checkpoints and metrics to ``<run dir>/finetune``. Everything not set here
    (loss, label smoothing, weight decay, AGC, precision, execution plan) is the main run's.
    """

    enabled: bool = False  # run it after the main training in the same command (else: run_train.py --finetune-from)
    epochs: int = 2
    max_steps: int | None = None  # cap on the stage's optimizer steps (the cosine schedule still spans `epochs`)
    image_size: int | None = None  # null = the test resolution (data.test_size, else the model's default)
    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"
    # Per optim.lr_reference_batch samples like optim.lr; cosine decay to 0, no warmup. Graphcore's EfficientNet
    # fine-tuning: SGD without momentum, lr 0.25 at global batch 800 (= 0.08 per 256).
    lr: float = 0.08
    momentum: float = 0.0
    # Module name ('blocks.14', 'stages.3'): parameters registered before it are frozen, and its BatchNorm /
    # dropout / stochastic-depth layers before it stay in eval mode. null = train every parameter.
    first_trainable: str | None = None
    micro_batch_size: int | None = None  # null = train.micro_batch_size (a larger image may need a smaller one)
    global_batch_size: int | None = None  # null = train.global_batch_size
    from_ema: bool = True  # start from the checkpoint's EMA weights when it has them (Graphcore: averaged weights)


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
