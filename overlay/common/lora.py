"""LoRA conditioning of convolution and linear layers: the core shared by every upstream of this project.

Paper: "Simple Drop-in LoRA Conditioning on Attention Layers Will Improve Your Diffusion Model".
An adapted layer computes, for a sample with composition weights omega (one per basis),

    y = W x + b  +  s * sum_i omega_i (B_i A_i x + E_i)

with W, b the base layer's own (a convolution, or a Linear on channels-last tokens), and m bases (A_i, B_i)
of rank r: A_i maps C_in to r channels with the base's kernel, B_i maps them back to C_out (a 1 x 1
convolution), E_i an optional bias term of shape (r, C_out) summed over its r rows (as in the paper
authors' EDM release, whose parameter counts include it), s a scale (1, or trainable). Where omega
comes from decides the method: UC-LoRA (Section 4.1) computes omega with a small MLP on the shared
condition embedding; TimeLoRA (Section 3.1) reads it from a table indexed by the time step; ClassLoRA
(Section 3.2) has one basis per class and uses the class vector itself as omega.

Initialisation follows the paper authors' release: A ~ N(0, (1/r)^2), B = 0, E = 0, scale 1, so an
adapted layer starts out computing exactly what its base layer computes.

The file reads: the layer (the formula and its reference path), its fast paths (the same function in
fewer operations), the check that a base layer is one it reproduces, then where omega comes from
(UC-LoRA, ClassLoRA, TimeLoRA). It imports only torch (and EDM's torch_utils where present): EDM
pickles embed its source and re-run it when loading, so it must run beside a pristine upstream tree,
and everything a LoRA layer runs stays in this one file.
"""

import torch

try:
    # EDM: snapshots embed this module's source, so they load without this project installed.
    from torch_utils import persistence
    persistent_class = persistence.persistent_class
except ImportError:
    # IDDPM and nano diffusion save state dicts: no source to embed.
    def persistent_class(cls):
        return cls

#----------------------------------------------------------------------------
# The paper's layer: a base layer (Linear, Conv1d or Conv2d) plus m rank-r LoRA bases, composed per
# sample by omega.

@persistent_class
class ComposedLoRAConv(torch.nn.Module):
    """Base layer plus a per-sample composition of LoRA bases.

    Parameters, state-dict names in brackets:
        [weight] [C_out, C_in, *kernel], [bias] [C_out] or None: the base layer's own parameters, kept
            under the upstream's names (see from_base()); a Linear has no kernel dimensions.
        [lora_A] [m*r, C_in, *kernel]: the down-projections A_1..A_m, stacked.
        [lora_B] [C_out, m*r]: the up-projections B_1..B_m, side by side.
        [lora_bias] [m*r, C_out] or None: the bias terms E_1..E_m, stacked.
        [lora_scale] [] or None: a trainable scale s on the whole LoRA update, initialised to 1 (None: 1).
    forward(x, omega): x [N, C_in, *spatial] (a convolution) or [N, ..., C_in] (a Linear: channels last),
        omega [N, m] or [1, m] (one condition for the whole batch, as EDM's samplers pass a single noise
        level) -> [N, C_out, *spatial] or [N, ..., C_out].
    """

    def __init__(self,
        in_channels,            # Input channels (features) of the base layer.
        out_channels,           # Output channels (features) of the base layer.
        kernel,                 # Kernel size of the base convolution (and of A); 1 for a Linear.
        num_dims,               # 2 for Conv2d, 1 for Conv1d (IDDPM attention), 0 for Linear (a transformer's tokens).
        bases,                  # Number of LoRA bases m.
        rank,                   # Rank r of each basis.
        base_bias   = True,     # Does the base layer have a bias?
        lora_bias   = True,     # Add the per-basis bias term E?
        trainable_scale = False, # A trainable scale on the LoRA update (initialised to 1) instead of a fixed 1?
    ):
        if bases < 1 or rank < 1:
            raise ValueError(f'LoRA needs bases >= 1 and rank >= 1, got bases={bases}, rank={rank}')
        if num_dims not in [0, 1, 2] or (num_dims == 0 and kernel != 1):
            raise ValueError(f'LoRA layers adapt Linear (num_dims=0, kernel=1), Conv1d and Conv2d, got num_dims={num_dims}, kernel={kernel}')
        super().__init__()
        self.bases = bases
        self.rank = rank
        self.padding = kernel // 2
        kernel_shape = [kernel] * num_dims
        # Zero placeholders until adopt_base() hands over the base layer's parameters; they draw no
        # random numbers, so the base network's initialisation is the same as without LoRA.
        self.weight = torch.nn.Parameter(torch.zeros(out_channels, in_channels, *kernel_shape))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if base_bias else None
        self.lora_A = torch.nn.Parameter(torch.randn(bases * rank, in_channels, *kernel_shape) / rank)
        self.lora_B = torch.nn.Parameter(torch.zeros(out_channels, bases * rank))
        self.lora_bias = torch.nn.Parameter(torch.zeros(bases * rank, out_channels)) if lora_bias else None
        self.lora_scale = torch.nn.Parameter(torch.ones([])) if trainable_scale else None

    @classmethod
    def from_base(cls, base, **options):
        """The LoRA layer on `base`: shapes (channels, kernel, dimensionality, bias) read from base's weight and
        bias, which it adopts (adopt_base()). base: torch.nn.Linear, Conv1d or Conv2d, or EDM's Conv2d or Linear;
        options: the class's other arguments (bases, rank, ...). Refuses (ValueError, one line) a base whose
        output the layer would not reproduce."""
        weight = getattr(base, 'weight', None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f'base layer {type(base).__name__} has no weight; LoRA layers adopt a Linear\'s or a convolution\'s weight and bias')
        if weight.ndim not in [2, 3, 4]:
            raise ValueError(f'base layer weight {list(weight.shape)} is not a Linear, Conv1d or Conv2d weight')
        layer = cls(in_channels=weight.shape[1], out_channels=weight.shape[0], kernel=weight.shape[-1] if weight.ndim > 2 else 1,
            num_dims=weight.ndim - 2, base_bias=getattr(base, 'bias', None) is not None, **options)
        return layer.adopt_base(base)

    def adopt_base(self, base):
        """Take over the base layer's parameter objects (not copies): same values, same names.

        Refuses (ValueError, one line) a base layer whose output base_forward() would not reproduce.
        """
        reason = self.why_not_reproducible(base)
        if reason is not None:
            raise ValueError(reason)
        self.weight = base.weight
        self.bias = base.bias
        return self

    @property
    def is_linear(self):
        # A Linear base: weight [C_out, C_in], input [..., C_in], channels last.
        return self.weight.ndim == 2

    def forward(self, x, omega):
        # The formula by the cheapest exact path; which one depends on the shapes only (see the fast paths).
        if omega.shape[0] == 1: # one condition for the whole batch (the samplers')
            return self.merged_forward(x, omega)
        if self.per_sample_merge_pays(x):
            return self.per_sample_merged_forward(x, omega)
        return self.low_rank_forward(x, omega)

    def reference_forward(self, x, omega):
        """The formula written out plainly, W x + b + s * sum_i omega_i (B_i A_i x + E_i): what every fast path equals."""
        delta = self.composed_delta(x, omega)
        if self.lora_scale is not None:
            delta = delta * self.lora_scale.to(x.dtype)
        return self.base_forward(x) + delta

    def base_forward(self, x):
        """W x + b: the base layer's own function."""
        return plain_forward(x, self.weight, self.bias, self.padding)

    def composed_delta(self, x, omega, first_basis=0):
        """sum_i omega_i (B_i A_i x + E_i), unscaled, over bases first_basis .. first_basis + omega.shape[1] - 1."""
        ranks = slice(first_basis * self.rank, (first_basis + omega.shape[1]) * self.rank)
        w = self.omega_per_rank(omega, x.dtype)
        lora_A, lora_B = self.lora_A[ranks].to(x.dtype), self.lora_B[:, ranks].to(x.dtype)
        if self.is_linear:
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A) * self.per_sample(w, x), lora_B)
        else: # B as a 1 x 1 convolution
            h = conv(x, lora_A, padding=self.padding) * self.per_sample(w, x)
            delta = conv(h, lora_B.reshape(*lora_B.shape, *[1] * (x.ndim - 2)))
        if self.lora_bias is not None:
            delta = delta + self.per_sample(w @ self.lora_bias[ranks].to(x.dtype), x)
        return delta

    def omega_per_rank(self, omega, dtype):
        """omega [N, m] as the weights [N, m*r] of the m*r stacked rank components: basis i owns components
        i*r .. (i+1)*r - 1 (rows of A and of E, columns of B), so omega_i is repeated r times."""
        return omega.to(dtype)[:, :, None].expand(-1, -1, self.rank).reshape(omega.shape[0], -1)

    def per_sample(self, values, x):
        """values [N, C] (one row a sample) or [C] (one for all) shaped to broadcast along the channels of
        activations like x: [N, C, 1, ...] for a convolution, [N, 1, ..., C] for channels-last tokens."""
        ones = [1] * (x.ndim - 2)
        if self.is_linear:
            return values.reshape(-1, *ones, values.shape[-1])
        return values.reshape(-1, values.shape[-1], *ones)

    #------------------------------------------------------------------------
    # Fast paths: the function of reference_forward() in fewer operations. forward() picks one from the
    # shapes alone, so no choice reads a tensor's values (none stalls a GPU).

    def merged_forward(self, x, omega):
        """forward() for omega [1, m]: one base-sized layer with W + s B diag(omega) A and b + s sum_i omega_i E_i."""
        # Exact: with one omega for every sample the update is one linear map, which adds to W and b.
        w = self.omega_per_rank(omega, self.lora_A.dtype)[0] # [m*r]
        if self.lora_scale is not None:
            w = w * self.lora_scale
        # W + B diag(w) A and b + E^T w, each one fused operation (a sampler calls this at every step).
        weight = torch.addmm(self.weight.flatten(1), self.lora_B, self.lora_A.flatten(1) * w[:, None]).reshape(self.weight.shape)
        bias = self.bias
        if self.lora_bias is not None:
            bias = w @ self.lora_bias if bias is None else torch.addmv(bias, self.lora_bias.T, w)
        bias = None if bias is None else bias.to(x.dtype)
        if self.is_linear:
            return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
        return conv(x, weight.to(x.dtype), bias, padding=self.padding)

    # Costs per multiply-add relative to the low-rank path's, fitted to forward + backward times on the CPU
    # (results/bench/layers-cpu.md, results/bench/notes.md). A convolution: forming the merged kernels (small
    # batched matrix products) is 3.5x as dear, the grouped convolution (one group a sample) with its layout
    # copies costs about one more base convolution. A Linear: forming the merged matrices is 1.5x as dear, and
    # the batched product costs no more than the shared one.
    KERNEL_FORMING_COST = 3.5
    GROUPED_CONV_OVERHEAD = 1.0
    MATRIX_FORMING_COST = 1.5

    def per_sample_merge_pays(self, x):
        """Is merging each sample's update into its own kernel cheaper than the low-rank path, for this input's shape?

        Multiply-adds a sample, beyond the base layer's: forming a merged kernel costs C_out * m r * C_in * k^d,
        and the grouped convolution's overhead is counted in the base convolution's HW * C_out * C_in * k^d; the
        low-rank path costs HW * m r * (C_in * k^d + C_out) (HW: positions a sample, a Linear's tokens). Merging
        wins where the positions are many and the channels few (nano diffusion's 16x16 and 32x32 layers), the
        low-rank path at few positions and many channels (EDM's and IDDPM's attention layers).
        """
        c_out, c_in, kernel = self.weight.shape[0], self.weight.shape[1], self.weight.shape[2:].numel()
        positions = (x.shape[1:-1] if self.is_linear else x.shape[2:]).numel()
        ranks = self.lora_A.shape[0]
        if self.is_linear:
            merge = self.MATRIX_FORMING_COST * c_out * ranks * c_in
        else:
            merge = self.KERNEL_FORMING_COST * c_out * ranks * c_in * kernel + self.GROUPED_CONV_OVERHEAD * positions * c_out * c_in * kernel
        low_rank = positions * ranks * (c_in * kernel + c_out)
        return merge < low_rank

    def per_sample_merged_forward(self, x, omega):
        """forward() as one layer a sample with its own merged kernel W + s B diag(omega_n) A and bias b + s E^T omega_n."""
        # Exact: each sample's update is a linear map, so its own merged kernel computes its own output; a
        # convolution runs as a grouped one, one group a sample, in channels-last layout (where MKL-DNN's
        # grouped kernels are fast), a Linear as a batched matrix product.
        n, c_in, c_out = x.shape[0], self.weight.shape[1], self.weight.shape[0]
        kernels = self.weight.flatten(1) + self.kernel_update(omega) # [N, C_out, C_in * k^d]
        bias = self.composed_bias(omega) # [C_out] or [N, C_out]
        bias = None if bias is None else bias.expand(n, c_out).to(x.dtype)
        if self.is_linear:
            tokens, kernels = x.reshape(n, -1, c_in), kernels.transpose(1, 2).to(x.dtype)
            y = torch.bmm(tokens, kernels) if bias is None else torch.baddbmm(bias[:, None], tokens, kernels)
            return y.reshape(*x.shape[:-1], c_out)
        weight = kernels.reshape(n * c_out, c_in, *self.weight.shape[2:]).to(x.dtype)
        bias = None if bias is None else bias.reshape(-1) # the grouped convolution's bias: one a sample's channel
        # With one input channel a sample the plain layout is already what the grouped kernel reads fast, and
        # the channels-last copies would cost more than they save (results/bench/notes.md).
        if x.ndim != 4 or c_in == 1:
            return conv(x.reshape(1, n * c_in, *x.shape[2:]), weight, bias, padding=self.padding, groups=n).reshape(n, c_out, *x.shape[2:])
        y = conv(BatchToGroups.apply(x), weight, bias, padding=self.padding, groups=n)
        return GroupsToBatch.apply(y, n)

    def kernel_update(self, omega):
        """s sum_i omega_i B_i A_i for omega [N, m]: [N, C_out, C_in * k^d]."""
        # B's columns times their basis' omega: B as [C_out, m, r] times omega as [N, 1, m, 1] (no repeated copy of omega).
        weighted_B = self.lora_B.unflatten(1, (self.bases, self.rank)) * omega.to(self.lora_B.dtype)[:, None, :, None]
        update = weighted_B.flatten(2) @ self.lora_A.flatten(1)
        return update if self.lora_scale is None else self.lora_scale * update

    def composed_bias(self, omega):
        """b + s sum_i omega_i E_i for omega [N, m]: [N, C_out], [C_out] without E, or None."""
        if self.lora_bias is None:
            return self.bias
        per_basis = self.lora_bias.unflatten(0, (self.bases, self.rank)).sum(1) # [m, C_out]: E_i summed over its r rows
        delta = omega.to(per_basis.dtype) @ per_basis
        delta = delta if self.lora_scale is None else self.lora_scale * delta
        return delta if self.bias is None else self.bias + delta

    def low_rank_forward(self, x, omega):
        """forward() through the low-rank path: W and A share one product (one pass over x), then B maps the
        omega-weighted A x back to C_out channels."""
        # Exact: the formula's own terms, W x + B diag(omega_n) A x + b + E^T omega_n, in another order.
        c_out = self.weight.shape[0]
        w = self.omega_per_rank(omega, x.dtype) # [N, m*r]
        lora_B = self.lora_B if self.lora_scale is None else self.lora_B * self.lora_scale
        bias = self.composed_bias(omega) # [C_out] or [N, C_out]
        if self.is_linear:
            h = torch.nn.functional.linear(x, torch.cat([self.weight, self.lora_A]).to(x.dtype)) # [N, ..., C_out + m*r]
            y = h[..., :c_out] + torch.nn.functional.linear(h[..., c_out:] * self.per_sample(w, x), lora_B.to(x.dtype))
            return y if bias is None else y + self.per_sample(bias.to(x.dtype), x)
        h = conv(x, torch.cat([self.weight, self.lora_A]).to(x.dtype), padding=self.padding).flatten(2) # [N, C_out + m*r, HW]
        y = h[:, :c_out] + torch.matmul(lora_B.to(x.dtype), h[:, c_out:] * w[:, :, None])
        if bias is not None:
            y = y + bias.to(x.dtype).reshape(-1, c_out, 1)
        return y.reshape(x.shape[0], c_out, *x.shape[2:])

    #------------------------------------------------------------------------
    # Base validation: adopt_base() takes a base layer only where base_forward() computes what it computes.

    def why_not_reproducible(self, base):
        """Why base_forward() would not compute what `base` computes, in one line; None if it would.

        First what the base says it is (its attributes, for a precise reason), then what it does (its own
        forward on a random input, which catches a forward that transforms its weight).
        """
        return self.why_configured_otherwise(base) or self.why_computing_otherwise(base)

    def why_configured_otherwise(self, base):
        """The attribute checks. base_forward() is a plain convolution with stride 1, no dilation, one group,
        zero padding of kernel // 2 on every side, plus bias, or a Linear's x W^T + b. The base layers it
        reproduces: torch.nn.Linear, and torch.nn.Conv1d/Conv2d so configured; EDM's training.networks.Linear,
        and its Conv2d without up/down (conv2d with padding kernel // 2). Properties a layer does not have count
        as the plain ones."""
        # The weight: present and of this layer's kind (Linear, Conv1d or Conv2d).
        weight = getattr(base, 'weight', None)
        if not isinstance(weight, torch.Tensor):
            return f'base layer {type(base).__name__} has no weight; LoRA layers adopt a Linear\'s or a convolution\'s weight and bias'
        if weight.ndim != self.weight.ndim:
            kind = 'Linear' if self.is_linear else f'Conv{self.weight.ndim - 2}d'
            return f'base layer weight {list(weight.shape)} is not a {kind} weight like the LoRA layer\'s {list(self.weight.shape)}'
        base_kernel = tuple(weight.shape[2:])

        # What torch.nn.ConvNd configures (tuples, or a string for padding).
        if getattr(base, 'transposed', False):
            return 'base layer is a transposed convolution; LoRA layers reproduce plain convolutions only'
        for name in ['stride', 'dilation']:
            value = getattr(base, name, 1)
            if any(v != 1 for v in _as_tuple(value)):
                return f'base layer has {name} {value}; LoRA layers reproduce {name} 1 only'
        groups = getattr(base, 'groups', 1)
        if groups != 1:
            return f'base layer has groups {groups}; LoRA layers reproduce groups 1 only'
        padding_mode = getattr(base, 'padding_mode', 'zeros')
        if padding_mode != 'zeros':
            return f'base layer has padding_mode {padding_mode!r}; LoRA layers reproduce padding_mode \'zeros\' only'
        padding = getattr(base, 'padding', None) # None: implicit kernel // 2, as EDM's Conv2d
        wanted = tuple(k // 2 for k in base_kernel)
        if padding == 'same': # torch pads k - 1 in all, the extra pixel of an even kernel on the far side
            effective = wanted if all(k % 2 == 1 for k in base_kernel) else None
        elif padding == 'valid':
            effective = (0,) * len(base_kernel)
        elif padding is None:
            effective = wanted
        else:
            effective = _as_tuple(padding, len(base_kernel))
        if effective != wanted:
            return f'base layer has padding {padding!r} with kernel {base_kernel}; LoRA layers reproduce padding kernel // 2 = {wanted} only'

        # What EDM's Conv2d configures: resampling before or after the convolution.
        for name in ['up', 'down']:
            if getattr(base, name, False):
                return f'base layer has {name}=True (resampling); LoRA layers reproduce a plain convolution only'

        # Shapes: kernel, channels, bias.
        if base_kernel != tuple(self.weight.shape[2:]):
            return f'base layer has kernel {base_kernel}; LoRA layer has kernel {tuple(self.weight.shape[2:])}'
        if weight.shape != self.weight.shape:
            return f'base layer weight {list(weight.shape)} does not match LoRA layer {list(self.weight.shape)} (channels)'
        base_bias = getattr(base, 'bias', None)
        if (base_bias is None) != (self.bias is None):
            return 'base layer has a bias; LoRA layer was built with base_bias=False' if self.bias is None else \
                'base layer has no bias; LoRA layer was built with base_bias=True'
        if base_bias is not None and base_bias.shape != self.bias.shape:
            return f'base layer bias {list(base_bias.shape)} does not match LoRA layer {list(self.bias.shape)}'
        return None

    def why_computing_otherwise(self, base):
        """The behaviour check: base's own forward and base_forward()'s function on one random input, with random
        weight and bias (a base's own may be zero, as EDM's proj, which hides what its forward does with them),
        in float64 on the CPU, wherever the base lives: a GPU is never waited for, and a base built on the meta
        device (shapes only, as train.py's option check builds) is checked alike, its other tensors drawn too.
        The draws come from a generator of their own: the global random state stays as it was."""
        generator = torch.Generator('cpu').manual_seed(0)
        draw = lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64, device='cpu')
        values = {}
        for name, value in [*base.named_parameters(), *base.named_buffers()]:
            if name in ['weight', 'bias'] or (value.is_meta and value.is_floating_point()):
                values[name] = draw(value.shape)
            elif not value.is_meta:
                values[name] = value.detach().to('cpu', torch.float64) if value.is_floating_point() else value.detach().cpu()
        c_in, kernel = self.weight.shape[1], self.weight.shape[2:]
        x = draw([2, 3, c_in] if self.is_linear else [2, c_in, *[k + 4 for k in kernel]]) # 2 samples, 3 tokens or k + 4 a side
        with torch.no_grad():
            try:
                expected = torch.func.functional_call(base, values, (x,))
            except Exception as error:
                first_line = (str(error).splitlines() or [''])[0]
                return f'base layer {type(base).__name__} fails on a float64 input {list(x.shape)} ({type(error).__name__}: {first_line}); LoRA layers adopt only what they can check'
            got = plain_forward(x, values['weight'], values.get('bias'), self.padding)
        # Beyond rounding: a base may compute in float32 whatever its input (1e-7); another function differs by far more.
        if got.shape != expected.shape or not bool((got - expected).abs().max() <= 1e-6 * expected.abs().max()):
            kind = 'x W^T + b' if self.is_linear else 'conv(x, W) + b'
            return f'base layer {type(base).__name__} computes something other than {kind} with its weight and bias (its forward differs on a random input); LoRA layers reproduce a plain layer only'
        return None

#----------------------------------------------------------------------------
# Fast paths outside the layer: the grouped convolution's layout, and one condition for a batch that shares it.

# The grouped convolution's layout: a batch [N, C, H, W] seen as one sample of N*C channels, [1, N*C, H, W], in
# channels-last memory order ([H, W, N*C]), and back. Each way is a transpose of the [N*C, H*W] matrix, copied
# exactly; torch's own copies between these layouts (4-D strided, some hidden inside convolution_backward) are
# slower than a 2-D transpose copied in panels of rows that stay in cache (results/bench/notes.md).

def copy_transposed(out, matrix, panel=128):
    """out[:] = matrix.t() for a 2-D matrix [R, S] and out [S, R], copied a panel of `panel` rows at a time on the CPU."""
    if matrix.device.type != 'cpu':
        return out.copy_(matrix.t())
    for start in range(0, matrix.shape[0], panel):
        out[:, start:start + panel].copy_(matrix[start:start + panel].t())
    return out


def batch_to_groups(x):
    """[N, C, H, W] -> the same values as [1, N*C, H, W], channels-last."""
    n, c, h, w = x.shape
    grouped = torch.empty((1, n * c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    copy_transposed(grouped.permute(0, 2, 3, 1).view(h * w, n * c), x.reshape(n * c, h * w))
    return grouped


def groups_to_batch(y, n):
    """[1, N*C, H, W] (any layout) -> the same values as [N, C, H, W], contiguous."""
    _, nc, h, w = y.shape
    y = y.contiguous(memory_format=torch.channels_last) # already so when it comes from batch_to_groups' convolution
    batch = y.new_empty(n, nc // n, h, w)
    copy_transposed(batch.view(nc, h * w), y.permute(0, 2, 3, 1).reshape(h * w, nc))
    return batch


class BatchToGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.batch = x.shape[0]
        return batch_to_groups(x)

    @staticmethod
    def backward(ctx, grad):
        return groups_to_batch(grad, ctx.batch)


class GroupsToBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, n):
        return groups_to_batch(y, n)

    @staticmethod
    def backward(ctx, grad):
        return batch_to_groups(grad), None


def one_condition_if_shared(conditions):
    """A batch's conditions [N, ...] (one a sample), or the first sample's alone [1, ...] where every sample has
    the same one (the samplers' one step): then each compositional LoRA layer merges its update into its weight
    once (ComposedLoRAConv.merged_forward) instead of running a per-sample path at every position. Only on the
    CPU: on a GPU, comparing the conditions would stall the device at every forward pass."""
    if len(conditions) > 1 and conditions.device.type == 'cpu' and bool((conditions == conditions[:1]).all()):
        return conditions[:1]
    return conditions

#----------------------------------------------------------------------------
# The MLP that maps a condition embedding to omega (paper Appendix A.5):
# Linear, GroupNorm, SiLU for each hidden width, then Linear to m outputs.

@persistent_class
class CompositionMLP(torch.nn.Module):
    def __init__(self,
        in_features,            # Width of the condition embedding.
        hidden_widths,          # Hidden widths, e.g. [128, 64].
        out_features,           # Number of LoRA bases m.
    ):
        if not hidden_widths or min(hidden_widths) < 1:
            raise ValueError(f'composition MLP widths must be positive integers, got {hidden_widths}')
        super().__init__()
        layers = []
        for width in hidden_widths:
            # GroupNorm grouped as EDM's own: at most 32 groups, at least 4 channels per group.
            layers += [self.linear(in_features, width), torch.nn.GroupNorm(max(min(32, width // 4), 1), width), torch.nn.SiLU()]
            in_features = width
        layers += [self.linear(in_features, out_features)]
        self.layers = torch.nn.Sequential(*layers)

    @staticmethod
    def linear(in_features, out_features):
        # EDM's Linear default: kaiming_normal weight, zero bias.
        layer = torch.nn.Linear(in_features, out_features)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(out_features, in_features) / in_features ** 0.5)
            layer.bias.zero_()
        return layer

    def forward(self, emb):
        # The MLP's parameters stay in fp32 (EDM's --fp16 lowers activations only).
        return self.layers(emb.to(torch.float32))


def omega_together(layers, emb):
    """{layer: its omega [N, m]} for UC-LoRA layers that share one embedding emb [N, F].

    The same function as each layer's own MLP, computed as one batched MLP: one matrix product for all first
    Linear layers (they read the same input), then batched products and one GroupNorm over all layers' groups
    (a GroupNorm's groups never cross a layer's channels), so a network of L adapted layers launches a handful
    of operations instead of 7 L tiny ones. Layers whose MLPs differ in shape are computed one by one.
    """
    mlps = [list(layer.lora_mlp.layers) for layer in layers] # each layer's modules; a Sequential's indexing is slow
    shapes = {tuple(tuple(module.weight.shape) for module in mlp if not isinstance(module, torch.nn.SiLU)) for mlp in mlps}
    if len(shapes) != 1 or len(layers) == 1:
        return {layer: layer.lora_mlp(emb) for layer in layers}
    h = emb.to(torch.float32)
    for index, module in enumerate(mlps[0]):
        modules = [mlp[index] for mlp in mlps] # this module of every layer's MLP
        if isinstance(module, torch.nn.Linear):
            weight = torch.stack([m.weight for m in modules]) # [L, out, in]
            bias = torch.stack([m.bias for m in modules])     # [L, out]
            if h.ndim == 2: # the shared input: one product for every layer
                h = (h @ weight.flatten(0, 1).T).unflatten(1, weight.shape[:2]) + bias
            else:           # h [N, L, in]: each layer its own matrix
                h = torch.einsum('nli,loi->nlo', h, weight) + bias
        elif isinstance(module, torch.nn.GroupNorm):
            h = torch.nn.functional.group_norm(h.flatten(1), len(modules) * module.num_groups, torch.cat([m.weight for m in modules]),
                torch.cat([m.bias for m in modules]), module.eps).unflatten(1, h.shape[1:])
        else:
            h = module(h)
    return dict(zip(layers, h.unbind(1)))

#----------------------------------------------------------------------------
# Unified compositional LoRA (UC-LoRA, paper Section 4.1): omega from an MLP on the condition embedding
# emb, one MLP per adapted layer.

@persistent_class
class UCLoRAConv(ComposedLoRAConv):
    """forward(x, emb): x as ComposedLoRAConv's, emb [N, emb_channels]. emb may instead be every layer's omega
    computed together ({layer: omega}, omega_together()): the layer takes its own."""

    def __init__(self,
        in_channels,            # Input channels (features) of the base layer.
        out_channels,           # Output channels (features) of the base layer.
        kernel,                 # Kernel size of the base convolution; 1 for a Linear.
        num_dims,               # 2 for Conv2d, 1 for Conv1d, 0 for Linear.
        bases,                  # Number of LoRA bases m.
        rank,                   # Rank r of each basis.
        emb_channels,           # Width of the condition embedding.
        mlp_widths  = [128,64], # Hidden widths of the composition MLP.
        base_bias   = True,     # Does the base layer have a bias?
        lora_bias   = True,     # Add the per-basis bias term E?
        trainable_scale = False, # A trainable scale on the LoRA update (initialised to 1) instead of a fixed 1?
    ):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel=kernel, num_dims=num_dims,
            bases=bases, rank=rank, base_bias=base_bias, lora_bias=lora_bias, trainable_scale=trainable_scale)
        self.lora_mlp = CompositionMLP(in_features=emb_channels, hidden_widths=mlp_widths, out_features=bases)

    def forward(self, x, emb):
        return super().forward(x, emb[self] if isinstance(emb, dict) else self.lora_mlp(emb))

#----------------------------------------------------------------------------
# ClassLoRA (paper Section 3.2, Appendix C) where the class vector is the whole condition, as in
# EDM: one basis per class, the class vector itself as omega (one-hot in training), no bias term and
# no MLP. The LoRA update is linear in the class vector, so interpolating or scaling the vector
# interpolates or scales the class LoRAs.

@persistent_class
class ClassLoRAConv(ComposedLoRAConv):
    """forward(x, c): x as ComposedLoRAConv's, c [N, K] or [1, K] class vectors."""

    def __init__(self,
        in_channels,            # Input channels (features) of the base layer.
        out_channels,           # Output channels (features) of the base layer.
        kernel,                 # Kernel size of the base convolution; 1 for a Linear.
        num_dims,               # 2 for Conv2d, 1 for Conv1d, 0 for Linear.
        num_classes,            # Number of classes K: one basis each.
        rank,                   # Rank r of each basis.
        base_bias   = True,     # Does the base layer have a bias?
        trainable_scale = False, # A trainable scale on the LoRA update (initialised to 1) instead of a fixed 1?
    ):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel=kernel, num_dims=num_dims,
            bases=num_classes, rank=rank, base_bias=base_bias, lora_bias=False, trainable_scale=trainable_scale)

#----------------------------------------------------------------------------
# TimeLoRA and ClassLoRA (paper Section 3) for discrete time steps: one set of stacked bases,
# the first m for time (compositional TimeLoRA), then one per class (ClassLoRA).

TABLE_INITS = ['interp', 'random'] # how TimeLoRA's composition table starts


def interpolation_table(steps, bases):
    """[steps, bases] initial omega of TimeLoRA (paper Section 3.1, Appendix A.4).

    Basis i sits at time step tau_i = i * (steps - 1) / (bases - 1), equally spaced from 0 to
    steps - 1 (with T = 4001 and 11 bases: every 400 steps). Step t mixes the two nearest bases
    linearly: omega is non-negative, sums to 1, and is one-hot at every tau_i. When bases - 1
    does not divide steps - 1, the tau_i are not integers and no step is one-hot but t = 0 and T - 1.
    """
    if steps < 2 or bases < 2:
        return torch.ones(steps, bases) / bases
    position = torch.arange(steps, dtype=torch.float64) * (bases - 1) / (steps - 1) # in units of bases
    lower = position.floor().long().clamp(max=bases - 2)
    upper_weight = position - lower
    table = torch.zeros(steps, bases, dtype=torch.float64)
    table[torch.arange(steps), lower] = 1 - upper_weight
    table[torch.arange(steps), lower + 1] = upper_weight
    return table.to(torch.float32)


@persistent_class
class TimeClassLoRAConv(ComposedLoRAConv):
    """TimeLoRA and/or ClassLoRA on one layer (paper Sections 3.1 and 3.2).

    The first bases are TimeLoRA's: m bases composed by [lora_table] [T, m], an nn.Embedding indexed
    by the time step whose rows are omega (compositional), or T bases, one per step (non-compositional:
    each sample uses its own step's LoRA only, gathered rather than weighted). The next K bases are
    ClassLoRA's, weighted by the class vector, so the layer is linear in it (interpolating or scaling
    the class vector interpolates or scales the class LoRAs).
    forward(x, t, c): x as ComposedLoRAConv's, t [N] integer time steps in [0, T), c [N, K] class
    vectors (one-hot in training) or None without ClassLoRA. t [1] and c [1, K] stand for the whole
    batch (one_condition_if_shared).
    """

    def __init__(self,
        in_channels,            # Input channels (features) of the base layer.
        out_channels,           # Output channels (features) of the base layer.
        kernel,                 # Kernel size of the base convolution; 1 for a Linear.
        num_dims,               # 2 for Conv2d, 1 for Conv1d (IDDPM attention), 0 for Linear.
        rank,                   # Rank r of each basis.
        time_steps,             # Number of time steps T: rows of the composition table.
        time_bases,             # TimeLoRA bases m, 0 = no TimeLoRA.
        num_classes,            # ClassLoRA bases K (one per class), 0 = no ClassLoRA.
        table_init  = 'interp', # 'interp' (two nearest bases, see interpolation_table) or 'random' (N(0, 1)).
        compositional = True,   # False: one LoRA per time step instead of time_bases composed ones.
        base_bias   = True,     # Does the base layer have a bias?
    ):
        if time_bases < 0 or num_classes < 0 or time_bases + num_classes == 0:
            raise ValueError(f'TimeLoRA/ClassLoRA needs time_bases >= 1 or num_classes >= 1, got {time_bases} and {num_classes}')
        if table_init not in TABLE_INITS:
            raise ValueError(f'unknown table_init "{table_init}" (choose from {", ".join(TABLE_INITS)})')
        table_bases = time_bases if compositional else 0
        if time_bases and not compositional:
            time_bases = time_steps # one basis per step
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel=kernel, num_dims=num_dims,
            bases=time_bases + num_classes, rank=rank, base_bias=base_bias, lora_bias=False)
        self.time_bases = time_bases
        self.num_classes = num_classes
        self.compositional = compositional
        self.lora_table = torch.nn.Embedding(time_steps, table_bases) if table_bases else None
        if self.lora_table is not None and table_init == 'interp':
            with torch.no_grad():
                self.lora_table.weight.copy_(interpolation_table(time_steps, table_bases))

    def forward(self, x, t, c=None):
        if self.compositional:
            omega = ([self.lora_table(t)] if self.lora_table is not None else []) + ([c] if self.num_classes else [])
            return super().forward(x, omega[0] if len(omega) == 1 else torch.cat(omega, dim=1))
        y = self.base_forward(x)
        if self.time_bases:
            y = y + self.step_delta(x, t)
        if self.num_classes:
            y = y + self.composed_delta(x, c, first_basis=self.time_bases)
        return y

    def step_delta(self, x, t):
        """B_t A_t x for each sample's own step t: a grouped convolution, one group per sample (a Linear: einsum)."""
        n, r = x.shape[0], self.rank
        t = t.expand(n) # one step for the whole batch: every sample gathers that step's LoRA
        A = self.lora_A[:self.time_bases * r].reshape(self.time_bases, r, *self.lora_A.shape[1:])[t].to(x.dtype) # [N, r, C_in, *kernel]
        B = self.lora_B[:, :self.time_bases * r].reshape(-1, self.time_bases, r)[:, t].to(x.dtype) # [C_out, N, r]
        if self.is_linear:
            return torch.einsum('n...r,onr->n...o', torch.einsum('n...i,nri->n...r', x, A), B)
        h = conv(x.reshape(1, -1, *x.shape[2:]), A.reshape(n * r, *A.shape[2:]), padding=self.padding, groups=n)
        return torch.einsum('onr,nr...->no...', B, h.reshape(n, r, *h.shape[2:]))

#----------------------------------------------------------------------------
# Helpers.

def conv(x, weight, bias=None, **kwargs):
    """torch's convolution for x's dimensionality: Conv2d's for x [N, C, H, W], Conv1d's for x [N, C, L]."""
    return (torch.nn.functional.conv2d if x.ndim == 4 else torch.nn.functional.conv1d)(x, weight, bias, **kwargs)


def plain_forward(x, weight, bias, padding):
    """W x + b, the base layer's function as the core computes it: a Linear's (weight [C_out, C_in]) on
    channels-last x, or a convolution padded by `padding` (kernel // 2) on every side."""
    if weight.ndim == 2:
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    y = conv(x, weight.to(x.dtype), padding=padding)
    if bias is not None:
        y = y.add_(bias.to(x.dtype).reshape(1, -1, *[1] * (x.ndim - 2)))
    return y


def _as_tuple(value, num_dims=1):
    # A convolution argument (stride, dilation, padding) as a tuple: torch stores tuples, but an int
    # means the same value along every dimension.
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_dims

#----------------------------------------------------------------------------
