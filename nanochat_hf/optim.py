"""nanochat's optimizer: Muon for the block matrices, AdamW for everything else, in one `torch.optim.Optimizer`.

Muon (per group of same-shape matrices, stacked): Nesterov momentum -> MuonEq row equilibration -> Polar Express
orthogonalisation -> Muon+ renormalisation -> NorMuon variance reduction -> cautious weight decay and update with
nanochat's shape-based LR factor `sqrt(max(1, rows / cols))`. Each stage can be switched off; with all of them off
and `orthogonalizer="newton_schulz"` the step is exactly `torch.optim.Muon` (the tests use it as the oracle).

Distributed (DDP): gradients arrive averaged, every rank keeps the full optimizer state, and only the expensive
part, the orthogonalisation, is split: rank r orthogonalises its share of each stack and an all-gather shares the
results. So every rank's state_dict is complete, a checkpoint resumes on any world size, and N processes step
exactly like one. FSDP shards the matrices themselves, which Muon cannot orthogonalise piecewise: it is refused.
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express (arXiv 2505.16932; num_iters=5, safety 2e-2, cushion 2), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Keller Jordan's quintic Newton-Schulz, as in torch.optim.Muon.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# On CPU a Muon group is updated one matrix at a time (cache-sized temporaries, 2-D matmuls).
CPU_MATRICES_PER_UPDATE = 1

FSDP_ERROR = (
    "Muon orthogonalises whole matrices, but FSDP shards them across ranks. Train with DDP instead "
    "(accelerate_configs/ddp_8gpu.yaml or multi_node.yaml): nanochat's models up to d32 fit one GPU per replica."
)


# name, shape, dtype, device -> a temporary
Buffer = Callable[[str, tuple[int, ...], torch.dtype, torch.device], Tensor]


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _coefficients(method: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    if method == "polar_express":
        return POLAR_EXPRESS_COEFFS[:steps]
    if method == "newton_schulz":
        return (NEWTON_SCHULZ_COEFFS,) * steps
    raise ValueError(f"unknown orthogonalizer {method!r}; use 'polar_express' or 'newton_schulz'")


def _spectral_bound(frobenius: Tensor, method: str) -> Tensor:
    """What the iteration divides its input by so that every singular value is at most 1 (each method's own)."""
    return frobenius * 1.01 + 1e-6 if method == "polar_express" else frobenius.clamp(min=1e-7)


def orthogonalize(g: Tensor, steps: int, method: str, dtype: torch.dtype) -> Tensor:
    """Approximate U V^T of a (rows, cols) matrix or of each matrix of a (K, rows, cols) stack."""
    coeffs = _coefficients(method, steps)
    x = g.to(dtype, copy=True)
    x.div_(_spectral_bound(x.norm(dim=(-2, -1), keepdim=True), method))
    return _iterate(x, coeffs, _fresh)


def _iterate(x: Tensor, coeffs: tuple[tuple[float, float, float], ...], buffer: Buffer) -> Tensor:
    """The odd polynomial iteration on a normalised x: X <- aX + (bA + cA^2) X with A = X X^T, the Gram matrix on
    the smaller side (for a tall X, X <- aX + X (bA + cA^2) with A = X^T X: the same products, no transposed copy).

    `buffer(name, shape, dtype, device)` gives the temporaries; x may be one of them (it is written over). A stack
    goes through batched matmuls (one kernel per iteration on GPU); a one-matrix stack through 2-D ones, which CPU
    BLAS runs about 10% faster. The result lives in a buffer: use it before the next call."""
    if x.dim() == 3 and x.size(0) == 1:
        return _iterate(x[0], coeffs, buffer).unsqueeze(0)
    mm, mm_add = (torch.mm, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    tall = x.size(-2) > x.size(-1)
    side = x.size(-1) if tall else x.size(-2)
    gram = buffer("gram", (*x.shape[:-2], side, side), x.dtype, x.device)
    poly = buffer("poly", gram.shape, x.dtype, x.device)
    nxt = buffer("iterate", x.shape, x.dtype, x.device)
    if nxt.data_ptr() == x.data_ptr():
        nxt = buffer("iterate2", x.shape, x.dtype, x.device)
    for a, b, c in coeffs:
        if tall:
            mm(x.mT, x, out=gram)
            mm_add(gram, gram, gram, beta=b, alpha=c, out=poly)
            mm_add(x, x, poly, beta=a, out=nxt)
        else:
            mm(x, x.mT, out=gram)
            mm_add(gram, gram, gram, beta=b, alpha=c, out=poly)
            mm_add(x, poly, x, beta=a, out=nxt)
        x, nxt = nxt, x
    return x


def _working_dtype(p: Tensor) -> torch.dtype:
    # Optimizer math runs in fp32 at least (bf16 weights get fp32 state), in fp64 for fp64 weights.
    return torch.promote_types(p.dtype, torch.float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_sharded(p: Tensor) -> bool:
    return type(p).__name__ == "DTensor"


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of groups: `kind="muon"` (2-D, same shape within a group) and `kind="adamw"`.

    Muon group keys: lr, momentum, nesterov, ns_steps, beta2 (NorMuon; None disables), weight_decay.
    AdamW group keys: lr, betas, eps, weight_decay (decoupled).
    """

    def __init__(
        self,
        param_groups: Iterable[dict],
        *,
        orthogonalizer: str = "polar_express",
        row_equilibration: bool = True,
        renormalize: bool = True,
        cautious_weight_decay: bool = True,
        ortho_dtype: torch.dtype | None = None,
    ):
        groups = []
        for group in param_groups:
            group = dict(group)
            kind = group.setdefault("kind", "adamw")
            params = list(group["params"])
            if kind == "muon":
                group.setdefault("momentum", 0.95)
                group.setdefault("nesterov", True)
                group.setdefault("ns_steps", 5)
                group.setdefault("beta2", 0.9)
                group.setdefault("weight_decay", 0.0)
                shapes = {tuple(p.shape) for p in params}
                if len(shapes) > 1 or any(p.dim() != 2 for p in params):
                    raise ValueError(f"a Muon group needs 2-D parameters of one shape, got shapes {sorted(shapes)}")
            elif kind == "adamw":
                group.setdefault("betas", (0.8, 0.95))
                group.setdefault("eps", 1e-10)
                group.setdefault("weight_decay", 0.0)
            else:
                raise ValueError(f"unknown group kind {kind!r}; use 'muon' or 'adamw'")
            if any(_is_sharded(p) for p in params):
                raise RuntimeError(FSDP_ERROR)
            group["params"] = params
            group.setdefault("initial_lr", group["lr"])
            groups.append(group)
        super().__init__(groups, defaults={})
        self.orthogonalizer = orthogonalizer
        self.row_equilibration = row_equilibration
        self.renormalize = renormalize
        self.cautious_weight_decay = cautious_weight_decay
        self.ortho_dtype = ortho_dtype
        self._scratch: dict[tuple, Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(_is_sharded(p) for p in params):
                raise RuntimeError(FSDP_ERROR)
            if group["kind"] == "muon":
                self._muon_step(group, group["params"])
            else:
                self._adamw_step(group, params)
        return loss

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            work = _working_dtype(p)
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=work)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=work)
            state["step"] += 1
            t = state["step"]
            g = p.grad.to(work)
            master = p.to(work)
            master.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].lerp_(g.square(), 1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            master.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
            p.copy_(master)

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            if p.grad is None:  # a stack is updated as a whole; a missing grad is a zero grad
                p.grad = torch.zeros_like(p)
        rows, cols = params[0].shape
        work = _working_dtype(params[0])
        state = self.state[params[0]]  # the group's stacked state lives on its first parameter
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=work, device=params[0].device)
            if group["beta2"] is not None:
                shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state["second_momentum_buffer"] = torch.zeros(shape, dtype=work, device=params[0].device)
        # Every stage is per matrix, so a group can be updated a few matrices at a time with identical results. On
        # CPU that keeps the working set in cache and below glibc's mmap threshold (whole-group temporaries of
        # 100+ MB are fresh pages every step, ~7 GB per d12 step); on GPU and under DDP the whole stack goes at once
        # (one batched matmul per iteration; one all-gather).
        chunk = len(params)
        if not params[0].is_cuda and not _distributed():
            chunk = CPU_MATRICES_PER_UPDATE
        second = state.get("second_momentum_buffer")
        for start in range(0, len(params), chunk):
            part = slice(start, start + chunk)
            self._muon_update(group, params[part], state["momentum_buffer"][part],
                              None if second is None else second[part])

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A temporary of the Muon update. On CPU it is kept from step to step: glibc returns freed blocks of a
        few MB to the kernel, and faulting them in again cost more than the arithmetic done in them. On GPU the
        caching allocator already reuses memory, and a kept buffer would only raise the peak."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, tuple(shape), dtype)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(shape, dtype=dtype)
        return buf

    def _muon_update(self, group: dict, params: list[Tensor], buf: Tensor, second: Tensor | None) -> None:
        """One Muon step for a stack of same-shape matrices; `buf` and `second` are views of the group's state.

        Written for few passes over memory, each into a kept buffer: on CPU the elementwise stages, not the
        matmuls, are what a step adds over plain Muon.
        """
        rows, cols = params[0].shape
        work, device = buf.dtype, buf.device
        shape = (len(params), rows, cols)
        # read-only: a single matrix's gradient is used in place, never written
        grads = params[0].grad.to(work).unsqueeze(0) if len(params) == 1 else torch.stack(
            [p.grad.to(work) for p in params])
        momentum = group["momentum"]
        buf.lerp_(grads, 1 - momentum)
        g = self._buffer("g", shape, work, device)
        if group["nesterov"]:
            torch.lerp(grads, buf, momentum, out=g)
        else:
            g.copy_(buf)

        # The iteration's input in its dtype (bf16 on every device: nanochat's and torch.optim.Muon's choice; the
        # iteration is an approximation anyway), divided by each method's bound on the spectral norm.
        low = self.ortho_dtype or torch.bfloat16
        x = self._buffer("ortho_in", shape, low, device)
        if self.row_equilibration:
            # MuonEq: every row to the mean row norm, so no row dominates the orthogonalisation. Then every row
            # has that norm, so the Frobenius norm is known without another pass: one multiplication does both.
            # (In place, then a copy: a multiplication that writes another dtype is ~10x slower on CPU.)
            row_norms = g.norm(dim=-1, keepdim=True)
            target = row_norms.square().sum(dim=(-2, -1), keepdim=True).sqrt() / math.sqrt(rows)
            row_factor = target / row_norms.clamp_min(1e-12)
            frobenius = (row_factor * row_norms).square().sum(dim=(-2, -1), keepdim=True).sqrt()
            x.copy_(g.mul_(row_factor / _spectral_bound(frobenius, self.orthogonalizer)))
        else:
            # torch.optim.Muon's order: the norm of the low-precision copy
            x.copy_(g)
            x.div_(_spectral_bound(x.norm(dim=(-2, -1), keepdim=True), self.orthogonalizer))
        u = g.copy_(self._iterate_shared(x, _coefficients(self.orthogonalizer, group["ns_steps"])))

        # Muon+ (a fixed Frobenius norm sqrt(min(rows, cols)), whatever the iteration left) and NorMuon (a per-row,
        # or per-column, second moment, rescaled so the update keeps its total norm) end in one per-row (or
        # per-column) factor, applied in the update itself.
        target_norm = math.sqrt(min(rows, cols))
        square = self._buffer("square", shape, work, device)
        if second is not None:
            red_dim = -1 if rows >= cols else -2
            size = u.size(red_dim)
            # a sum of squares: torch's norm along a strided dimension is ~10x slower on CPU
            v_mean = torch.mul(u, u, out=square).sum(dim=red_dim, keepdim=True).div_(size)
            scale = 1.0
            if self.renormalize:
                scale = target_norm / (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt().clamp_min(1e-12)
                v_mean.mul_(scale.square())
            v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
            second.lerp_(v_mean, 1 - group["beta2"])
            step_size = second.clamp_min(1e-10).rsqrt()
            v_norm_new = ((v_mean * size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
            factor = step_size * (scale * v_norm / v_norm_new.clamp_min(1e-10))
        elif self.renormalize:
            factor = target_norm / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        else:
            factor = torch.ones(len(params), 1, 1, dtype=work, device=device)

        lr = group["lr"]
        adjusted_lr = lr * math.sqrt(max(1.0, rows / cols))
        wd = group["weight_decay"]
        # parameters already in the working dtype are updated in place; others through an fp32 (or fp64) copy
        masters = [p if p.dtype == work else p.to(work) for p in params]
        for master, direction, f, agree in zip(masters, u.unbind(0), factor.unbind(0), square.unbind(0), strict=True):
            if wd and self.cautious_weight_decay:
                # decay only where the update and the weight agree in sign (arXiv 2411.16085); the factor is
                # positive, so the direction's sign is the update's; ge_ in place leaves a 0/1 mask
                torch.mul(direction, master, out=agree).ge_(0)
                master.addcmul_(master, agree, value=-adjusted_lr * wd)
            elif wd:
                master.mul_(1 - lr * wd)
            master.addcmul_(direction, f, value=-adjusted_lr)
        for p, master in zip(params, masters, strict=True):
            if master is not p:
                p.copy_(master)

    def _iterate_shared(self, x: Tensor, coeffs: tuple[tuple[float, float, float], ...]) -> Tensor:
        """Orthogonalise the normalised stack x; under torch.distributed each rank iterates on a contiguous share,
        then an all-gather shares the results."""
        if not _distributed():
            return _iterate(x, coeffs, self._buffer)
        world, rank = dist.get_world_size(), dist.get_rank()
        chunk = math.ceil(x.size(0) / world)
        padded = torch.zeros((chunk * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.size(0)] = x
        mine = _iterate(padded[rank * chunk : (rank + 1) * chunk], coeffs, self._buffer)
        pieces = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(pieces, mine.contiguous())
        return torch.cat(pieces)[: x.size(0)]


# ---------------------------------------------------------------------------------------------------------------
# nanochat's parameter groups


def nanochat_param_groups(
    model: torch.nn.Module,
    *,
    embedding_lr: float = 0.3,
    unembedding_lr: float = 0.008,
    matrix_lr: float = 0.02,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.28,
    batch_lr_scale: float = 1.0,
) -> list[dict]:
    """nanochat HEAD's `GPT.setup_optimizer` groups for a NanoChatForCausalLM.

    AdamW LRs are scaled by `(d_model / 768) ** -0.5`; every LR but the smear group's by `batch_lr_scale`.
    Muon gets every parameter under `model.layers` (the ve_gate matrices included), one group per shape.
    """
    d = model.config.hidden_size
    dmodel_scale = (d / 768) ** -0.5
    core = model.model
    groups = [
        dict(kind="adamw", params=[model.lm_head.weight], lr=unembedding_lr * dmodel_scale * batch_lr_scale,
             betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01, name="lm_head"),
        dict(kind="adamw", params=[core.embed_tokens.weight], lr=embedding_lr * dmodel_scale * batch_lr_scale,
             betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001, name="wte"),
    ]
    if len(core.value_embeds):
        groups.append(dict(kind="adamw", params=list(core.value_embeds.parameters()),
                           lr=embedding_lr * dmodel_scale * 0.5 * batch_lr_scale, betas=(0.8, 0.995), eps=1e-10,
                           weight_decay=0.01, name="value_embeds"))
    if core.resid_lambdas is not None:
        groups.append(dict(kind="adamw", params=[core.resid_lambdas], lr=scalar_lr * 0.01 * batch_lr_scale,
                           betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05, name="resid_lambdas"))
        groups.append(dict(kind="adamw", params=[core.x0_lambdas], lr=scalar_lr * batch_lr_scale,
                           betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0, name="x0_lambdas"))
    smear = [t for t in (getattr(core.smear_gate, "weight", None), core.smear_lambda, core.backout_lambda)
             if t is not None]
    if smear:
        groups.append(dict(kind="adamw", params=smear, lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                           name="smear"))
    matrices = list(core.layers.parameters())
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=matrix_lr * batch_lr_scale, momentum=0.95, ns_steps=5, beta2=0.9,
                           weight_decay=weight_decay, name=f"muon{shape}"))
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
    if missing:
        raise ValueError(f"parameters without an optimizer group: {missing}")
    return groups


# ---------------------------------------------------------------------------------------------------------------
# schedules


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Linear warmup, constant, then a linear warmdown over the last `warmdown_ratio` to `final_lr_frac`."""
    warmdown_steps = round(warmdown_ratio * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= total_steps - warmdown_steps:
        return 1.0
    progress = (total_steps - step) / max(warmdown_steps, 1)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, total_steps: int, warmdown_ratio: float = 0.65) -> float:
    """0.85 -> 0.97 over the first 400 steps, constant, then 0.97 -> 0.90 during the warmdown."""
    warmdown_start = total_steps - round(warmdown_ratio * total_steps)
    if step < 400:
        momentum = 0.85 + (0.97 - 0.85) * step / 400
    else:
        momentum = 0.97
    if step > warmdown_start and total_steps > warmdown_start:
        frac = (step - warmdown_start) / (total_steps - warmdown_start)
        momentum = min(momentum, 0.97 + (0.90 - 0.97) * frac)
    return momentum


def weight_decay_multiplier(step: int, total_steps: int) -> float:
    """Muon weight decay follows a cosine from its full value to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))


class NanoChatSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets, at every step, each group's LR, and the Muon groups' momentum and weight decay, from the step alone."""

    def __init__(self, optimizer: MuonAdamW, total_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                 final_lr_frac: float = 0.05, momentum_schedule: bool = True, weight_decay_schedule: bool = True,
                 last_epoch: int = -1):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac
        self.momentum_schedule = momentum_schedule
        self.weight_decay_schedule = weight_decay_schedule
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        mult = lr_multiplier(step, self.total_steps, self.warmup_steps, self.warmdown_ratio, self.final_lr_frac)
        for group in self.optimizer.param_groups:
            if group["kind"] != "muon":
                continue
            if self.momentum_schedule:
                group["momentum"] = muon_momentum(step, self.total_steps, self.warmdown_ratio)
            if self.weight_decay_schedule:
                group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(step, self.total_steps)
        return [group["initial_lr"] * mult for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        # Construction applied step 0's values to the optimizer; re-apply those of the restored step.
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
