"""Cross-entropy over the vocabulary without the full logits: the training loss of a causal LM
computed a chunk of tokens at a time, its gradient in the same pass.

With a 128k-250k vocabulary, transformers' loss holds tokens x vocab logits in the model's dtype,
their fp32 copy and the fp32 log-softmax for backward: gigabytes for one batch. Here only one
chunk's logits exist at a time. The gradient of the loss with respect to the hidden states is
computed while the chunk's softmax is at hand, so backward only scales it by grad_output.

`patch_causal_lm` makes a transformers CausalLM (or a peft model around one) use it for its
training loss. Written by hand because transformers has no loss from hidden states (its
loss_function receives logits) and Liger-Kernel's fused version is Triton on CUDA only; on CUDA,
where liger_kernel is installed, chunked_cross_entropy hands the work to it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
from torch import nn

# Model types whose CausalLM forward we read in transformers 5: decoder, then the output head,
# then at most config.final_logit_softcapping, then self.loss_function(logits, labels, ...).
# Not here on purpose: granite (divides logits by logits_scaling), cohere (multiplies by
# logit_scale); a head transform we did not apply would change the loss silently.
SUPPORTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "gpt_neox", "gptj", "gpt_neo", "gpt2", "gpt_bigcode",
    "starcoder2", "olmo", "olmo2", "smollm3", "opt", "falcon", "bloom", "mpt", "codegen",
})


def chunked_cross_entropy(hidden, lm_head_weight, labels, *, chunk_tokens=1024,
                          ignore_index=-100, num_items_in_batch=None, lm_head_bias=None,
                          final_logit_softcapping=None, shift_labels=None):
    """The causal-LM loss of `hidden @ lm_head_weight.T (+ bias)` against `labels`, reduced exactly
    as transformers' ForCausalLMLoss: labels shifted by one (token t predicts t+1; or `shift_labels`
    given already shifted), sum / num_items_in_batch when given, else the mean over the tokens whose
    label is not ignore_index. hidden: (..., tokens, hidden_size); labels: (..., tokens).
    Working memory: about 6 bytes x chunk_tokens x vocabulary (0.8 GB at 1024 x 128k)."""
    if shift_labels is None:
        padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(flat_hidden.device)
    if flat_hidden.is_cuda and _liger_installed():
        return _liger_loss(flat_hidden, lm_head_weight, lm_head_bias, targets, ignore_index,
                           num_items_in_batch, final_logit_softcapping)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    if num_items_in_batch is None:
        divisor = torch.tensor(float(rows.numel()), device=flat_hidden.device)
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=flat_hidden.device).float()
    wants = [torch.is_grad_enabled() and t is not None and t.requires_grad
             for t in (flat_hidden, lm_head_weight, lm_head_bias)]
    return _ChunkedCrossEntropy.apply(flat_hidden, lm_head_weight, lm_head_bias, targets, rows,
                                      divisor, chunk_tokens, final_logit_softcapping, wants)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over chunks of the labelled rows (ignored rows have neither
    loss nor gradient, so their logits are never computed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, divisor, chunk_tokens, softcap, wants):
        want_hidden, want_weight, want_bias = wants
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        # fp32 accumulators: summing chunk by chunk in bf16 would lose the small contributions.
        grad_weight = _fp32_zeros(weight) if want_weight else None
        grad_bias = _fp32_zeros(bias) if want_bias else None
        for start in range(0, rows.numel(), chunk_tokens):
            index = rows[start:start + chunk_tokens]
            chunk_hidden = hidden[index]
            chunk_loss, grad_logits = _chunk_loss(chunk_hidden, targets[index], weight, bias,
                                                  softcap, divisor, want_grad=any(wants))
            loss_sum += chunk_loss
            if grad_logits is None:
                continue
            if want_hidden:
                chunk_grad = grad_logits.to(weight.dtype) @ weight
                grad_hidden.index_copy_(0, index, chunk_grad.to(hidden.dtype))
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), chunk_hidden.float())
            if want_bias:
                grad_bias += grad_logits.sum(dim=0)
            del grad_logits  # else this chunk's logits live on while the next chunk's are made
        ctx.grads = (grad_hidden,
                     grad_weight.to(weight.dtype) if want_weight else None,
                     grad_bias.to(bias.dtype) if want_bias else None)
        return loss_sum / divisor

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [None if grad is None else grad * grad_output.to(grad.dtype)
                  for grad in ctx.grads]
        return (*scaled, None, None, None, None, None, None)


def _fp32_zeros(like):
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def _chunk_loss(chunk_hidden, chunk_targets, weight, bias, softcap, divisor, want_grad):
    """(summed loss of one chunk's rows, d loss / d logits or None). In place after the first
    step, so that one fp32 chunk of logits is alive, not the three that logsumexp, softmax and the
    gradient would each allocate."""
    # As the model and ForCausalLMLoss do: the head in the compute dtype, then fp32 (softcapping
    # too, where the model caps in its compute dtype: as exact, or a little more).
    logits = nn.functional.linear(chunk_hidden, weight, bias).float()
    tanh_logits = None
    if softcap is not None:
        tanh_logits = logits.div_(softcap).tanh_().clone()
        logits.mul_(softcap)
    target_logits = logits.gather(1, chunk_targets[:, None])
    row_max = logits.amax(dim=-1, keepdim=True)
    exp_logits = logits.sub_(row_max).exp_()
    sum_exp = exp_logits.sum(dim=-1, keepdim=True)
    loss = (sum_exp.log() + row_max - target_logits).sum()
    if not want_grad:
        return loss, None
    # softmax - one_hot(target), over the divisor of the reduction
    grad_logits = exp_logits.div_(sum_exp)
    minus_one = grad_logits.new_full((len(chunk_targets), 1), -1.0)
    grad_logits.scatter_add_(1, chunk_targets[:, None], minus_one)
    if tanh_logits is not None:  # d/dx of softcap * tanh(x / softcap)
        grad_logits.mul_(tanh_logits.square_().neg_().add_(1))
    return loss, grad_logits.div_(divisor)


@functools.cache
def _liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _liger_loss(flat_hidden, weight, bias, targets, ignore_index, num_items_in_batch, softcap):
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA only): the same chunked idea, well
    kept and faster than ours on a GPU; it too skips the head's gradient when the head is frozen."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    reduction = "mean" if num_items_in_batch is None else "sum"
    extra = {} if softcap is None else {"softcap": softcap}
    loss = liger_fused_linear_cross_entropy(flat_hidden, weight, targets, bias=bias,
                                            ignore_index=ignore_index, reduction=reduction, **extra)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def patch_causal_lm(model) -> bool:
    """Make `model` (a transformers CausalLM, or a peft model around one) compute its loss with
    chunked_cross_entropy whenever it is called with labels, returning no logits then; without
    labels (generation, inference) it runs exactly as before. False, and nothing changed, for an
    architecture this does not know, so the caller keeps the ordinary loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(causal_lm.forward, _ForwardWithChunkedLoss):
        return True
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(causal_lm, "loss_function", None) is not ForCausalLMLoss:
        return False  # someone chose another loss: keep it
    if _plain_head(causal_lm) is None:
        return False
    causal_lm.forward = _ForwardWithChunkedLoss(causal_lm, causal_lm.forward)
    return True


def _plain_head(causal_lm):
    """The output head when it is an ordinary nn.Linear (not 4-bit, not LoRA-wrapped), else None."""
    head = causal_lm.get_output_embeddings()
    return head if type(head) is nn.Linear else None


class _ForwardWithChunkedLoss:
    """Stands in for one model's forward. Given labels, it runs the model's own forward with two
    calls redirected for that one call: the head hands back an empty stand-in for the logits (and
    keeps the hidden states), and loss_function computes the chunked loss from those hidden states.
    Everything else (the decoder's arguments, caches, return_dict, logits_to_keep) stays the
    model's own code."""

    def __init__(self, causal_lm, unpatched):
        self.causal_lm = causal_lm
        self.unpatched = unpatched
        # Trainer reads forward's parameters: the dataset columns to keep, num_items_in_batch.
        functools.update_wrapper(self, unpatched)
        self.signature = inspect.signature(unpatched)

    def __call__(self, *args, **kwargs):
        labels = self.signature.bind_partial(*args, **kwargs).arguments.get("labels")
        head = _plain_head(self.causal_lm)
        if labels is None or head is None:
            return self.unpatched(*args, **kwargs)
        with _LossFromHidden(self.causal_lm, head) as redirect:
            output = self.unpatched(*args, **kwargs)
        return redirect.without_logits(output)


class _LossFromHidden:
    """For one forward call: the head keeps its input and returns an empty (..., 0) tensor; the
    model's loss_function becomes chunked_cross_entropy on what the head kept."""

    _ABSENT = object()

    def __init__(self, causal_lm, head):
        self.causal_lm, self.head = causal_lm, head
        self.hidden = self.stand_in = None
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def __enter__(self):
        # Instance attributes, restored on exit: an accelerate hook may already have set one.
        self.head_forward = self.head.__dict__.get("forward", self._ABSENT)
        self.loss_function = self.causal_lm.__dict__.get("_loss_function", self._ABSENT)
        self.head.forward = self._keep_hidden
        self.causal_lm.loss_function = self._loss
        return self

    def __exit__(self, *exc):
        for owner, name, saved in ((self.head, "forward", self.head_forward),
                                   (self.causal_lm, "_loss_function", self.loss_function)):
            if saved is self._ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, saved)

    def _keep_hidden(self, hidden_states):
        self.hidden = hidden_states
        return hidden_states.new_empty((*hidden_states.shape[:-1], 0))

    def _loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
              shift_labels=None, **kwargs):
        self.stand_in = logits  # the empty tensor after the model's own steps (e.g. softcapping)
        return chunked_cross_entropy(self.hidden, self.head.weight, labels,
                                     ignore_index=ignore_index, shift_labels=shift_labels,
                                     num_items_in_batch=num_items_in_batch,
                                     lm_head_bias=self.head.bias,
                                     final_logit_softcapping=self.softcap)

    def without_logits(self, output):
        if self.stand_in is None:
            raise RuntimeError(f"{type(self.causal_lm).__name__} computed its loss without "
                               "loss_function, so the chunked loss cannot stand in for it: "
                               "train it without the chunked loss.")
        if isinstance(output, tuple):  # return_dict=False: transformers leaves out what is None
            return tuple(item for item in output if item is not self.stand_in)
        return type(output)(**{key: value for key, value in output.items()
                               if key != "logits"})
