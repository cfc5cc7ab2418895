"""One implementation's model and the four benchmark tasks (sample, train, train_ckpt, nll).

A workload is described by a spec (a JSON-able dict, see make_spec) made in this checkout: the
architecture as constructor arguments (`models.fractalgen.MODELS[name].config`), a file of random
weights and a file with one batch of images and labels, so that every implementation, in its own
process and checkout (bench.py's workers), builds the same model and trains on the same data. The
`models` package is imported only when a Workload is built, from the checkout first on sys.path.
"""
import contextlib
import copy
import os
import sys
import types

import torch

from benchmarks import measure

TASKS = ("sample", "train", "train_ckpt", "nll")


def set_grad_checkpointing(model, flag):
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = flag


def train_step(model, optimizer, scaler, images, labels, amp):
    """One training step as the release takes it: forward under autocast, backward, AdamW through a
    GradScaler (enabled in fp16)."""
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        loss = model(images, labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def random_batch(n, size, class_num, seed=0):
    """n random images, normalized as models.layers' data pipeline normalizes, and labels (this checkout's
    models.layers: call it in this checkout's process)."""
    from models.layers import IMAGENET_MEAN, IMAGENET_STD
    g = torch.Generator().manual_seed(seed)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images = (torch.randint(0, 256, (n, 3, size, size), generator=g) / 255.0 - mean) / std
    return images, torch.randint(0, class_num, (n,), generator=g)


def add_workload_flags(p):
    """The flags that say what a workload is (shared by bench.py and breakdown.py)."""
    p.add_argument("--model", default="fractalmar_small_in32", help="a name in models.fractalgen.MODELS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--amp", default="fp32", choices=list(measure.AMP_DTYPES), help="autocast dtype for all tasks")
    p.add_argument("--class_num", type=int, default=10)
    p.add_argument("--num_conds", type=int, default=None, help="default: 5 for MAR-first models, else 1")
    p.add_argument("--guiding_pixel", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="images per sampling call")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--num_iter_list", default="16,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--filter_threshold", type=float, default=1e-4)
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--nll_batch", type=int, default=16)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allocator", default="own", choices=["own", "default"],
                   help="own: each implementation sets up malloc as its CLI does on the CPU (ours keeps freed memory, "
                        "util.misc.keep_freed_memory); default: glibc's defaults for all, to compare the code alone")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="fix every MAR level's training mask ratio (and --nll_mask_ratio for the NLL) in every "
                        "implementation, so that calls do the same work (benchmarks/release.py); default 0.8 "
                        "when --compare is the release, else each implementation's own draws")
    p.add_argument("--nll_mask_ratio", type=float, default=0.5)


def make_spec(args, folder):
    """The workload of `args` as a dict every worker can rebuild: this checkout's architecture, its random
    weights and one batch saved in `folder`."""
    from models.fractalgen import MODELS, FractalGen
    if args.model not in MODELS:
        raise SystemExit(f"unknown model {args.model!r}; valid names: {', '.join(MODELS)}")
    config = {k: list(v) for k, v in MODELS[args.model].config.items()}
    mar_first = config["generator_type_list"][0] == "mar"
    model_kwargs = dict(class_num=args.class_num, guiding_pixel=args.guiding_pixel,
                        num_conds=args.num_conds or (5 if mar_first else 1))
    torch.manual_seed(args.seed)
    weights, data = os.path.join(folder, "weights.pth"), os.path.join(folder, "batch.pth")
    torch.save(FractalGen(**config, **model_kwargs).state_dict(), weights)
    torch.save(random_batch(max(args.train_batch, args.nll_batch), config["img_size_list"][0], args.class_num,
                            args.seed), data)
    keys = ("model", "device", "threads", "amp", "batch", "cfg", "cfg_schedule", "temperature", "filter_threshold",
            "train_batch", "nll_batch", "seed", "allocator", "mask_ratio", "nll_mask_ratio")
    return {**{k: getattr(args, k) for k in keys}, "config": config, "model_kwargs": model_kwargs,
            "weights": weights, "data": data, "num_iter_list": [int(x) for x in str(args.num_iter_list).split(",")]}


def set_up_allocator(spec):
    """With allocator "own", malloc is set up as the implementation's own CLI does on the CPU: ours keeps
    freed memory (util.misc.keep_freed_memory); a checkout without that function keeps glibc's defaults."""
    if spec.allocator != "own" or torch.device(spec.device).type != "cpu":
        return "default"
    try:
        from util.misc import keep_freed_memory
    except ImportError:
        return "default"
    return "keeps freed memory" if keep_freed_memory() else "default"


class Workload:
    """The model of `spec` built from the checkout at `root`, with a deep copy to train (training must not
    change the sampler) and the four tasks, each call seeded.

    Options of the spec beyond make_spec's: release_head (release_like.py's head work), compile (our
    compile_blocks for training), compile_scope (util.sampling.compile_sampling for sampling).
    """

    def __init__(self, root, spec):
        self.spec = spec = types.SimpleNamespace(**{"release_head": False, "compile": False, "compile_backend": "inductor",
                                                    "compile_scope": None, "sample_compile_mode": None,
                                                    "sample_compile_backend": "inductor", **spec})
        if spec.threads:
            torch.set_num_threads(spec.threads)
        sys.path.insert(0, root)
        self.allocator = set_up_allocator(spec)
        from models.fractalgen import FractalGen
        self.device = torch.device(spec.device)
        self.amp = measure.AMP_DTYPES[spec.amp]
        self.model = FractalGen(**spec.config, **spec.model_kwargs).to(self.device).eval()
        self.model.load_state_dict(torch.load(spec.weights, map_location=self.device), strict=True)
        if spec.release_head:
            from benchmarks.release_like import use_release_head
            use_release_head(self.model)
        self.train_model = copy.deepcopy(self.model).train()
        self.fixed_mask_levels = self.fix_mask_ratios()
        self.compiled = spec.compile and self.compile_for_training()
        if spec.compile_scope:
            from util.sampling import compile_sampling
            compile_sampling(self.model, spec.compile_scope, mode=spec.sample_compile_mode,
                             backend=spec.sample_compile_backend)
        self.optimizer = torch.optim.AdamW(self.train_model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.images, self.labels = (x.to(self.device) for x in torch.load(spec.data))
        self.params = sum(p.numel() for p in self.model.parameters())

    def fix_mask_ratios(self):
        """mask_ratio: fix the MAR mask ratios of both models (release.py says why). Returns the number of
        MAR levels fixed per model (0: each implementation draws its own)."""
        if self.spec.mask_ratio is None:
            return 0
        from benchmarks.release import fix_mask_ratios
        fix_mask_ratios(self.model, self.spec.mask_ratio, self.spec.nll_mask_ratio)
        return fix_mask_ratios(self.train_model, self.spec.mask_ratio, self.spec.nll_mask_ratio)

    def compile_for_training(self):
        """The checkout's compile_blocks (ours: models.fractalgen); False where it has none."""
        try:
            from models.fractalgen import compile_blocks
        except ImportError:
            return False
        compile_blocks(self.train_model, self.spec.compile_backend)
        return True

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def sample(self):
        s = self.spec
        torch.manual_seed(s.seed)
        labels = torch.arange(s.batch, device=self.device) % s.model_kwargs["class_num"]
        with torch.no_grad(), self.autocast():  # the release-compatible sample(): every checkout has it
            cond = self.model.class_emb(labels)
            if s.cfg != 1.0:
                cond = torch.cat([cond, self.model.fake_latent.repeat(s.batch, 1)])
            return self.model.sample(cond_list=[cond] * 5, num_iter_list=s.num_iter_list, cfg=s.cfg,
                                     cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                     filter_threshold=s.filter_threshold, fractal_level=0)

    def train_loss(self, seed):
        """The training-mode loss of the first train_batch images, with dropout and masks seeded."""
        torch.manual_seed(seed)
        n = self.spec.train_batch
        with self.autocast():
            return self.train_model(self.images[:n], self.labels[:n])

    def train_step(self, ckpt=False):
        set_grad_checkpointing(self.train_model, ckpt)
        torch.manual_seed(self.spec.seed)
        n = self.spec.train_batch
        train_step(self.train_model, self.optimizer, self.scaler, self.images[:n], self.labels[:n], self.amp)

    def nll(self):
        torch.manual_seed(self.spec.seed)
        n = self.spec.nll_batch
        with torch.no_grad(), self.autocast():
            return self.model(self.images[:n], self.labels[:n])

    def task(self, name):
        return {"sample": self.sample, "train": lambda: self.train_step(False),
                "train_ckpt": lambda: self.train_step(True), "nll": self.nll}[name]
