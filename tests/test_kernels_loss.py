"""kernels.chunked_loss: the chunked cross-entropy equals transformers' ForCausalLMLoss on full
logits (loss and gradients), and a patched model trains, evaluates and generates as before."""

import copy

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from kernels import chunked_loss
from kernels.chunked_loss import chunked_cross_entropy, patch_causal_lm

BATCH, TOKENS, HIDDEN, VOCAB = 3, 11, 32, 97
LABELLED_ROWS = 24  # of the 33 rows below: each sequence's last, a prompt and padding are ignored


def _inputs(dtype=torch.float32, ignore_index=-100, bias=False, weight_grad=False):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, TOKENS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5
    head_bias = torch.randn(VOCAB, generator=generator).to(dtype) if bias else None
    labels = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    labels[0, :4] = ignore_index  # a prompt the loss skips
    labels[2, 8:] = ignore_index  # padding at the end
    assert (labels[:, 1:] != ignore_index).sum() == LABELLED_ROWS
    if head_bias is not None:
        head_bias.requires_grad_(weight_grad)
    return (hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(weight_grad),
            head_bias, labels)


def _plain_loss(hidden, weight, bias, labels, softcap=None, **loss_kwargs):
    """What a transformers model does: full logits in the model's dtype, then ForCausalLMLoss."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, VOCAB, **loss_kwargs)


def _gradients(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


def _relative_error(ours, reference):
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize("chunk_tokens, num_items, softcap, bias, weight_grad, ignore_index", [
    (1024, None, None, False, False, -100),  # one chunk
    (4, None, None, False, True, -100),  # 4 divides the 24 labelled rows
    (5, 40, None, True, True, -100),  # 5 does not; num_items_in_batch as Trainer passes it
    (6, torch.tensor(17), 2.0, False, False, -100),  # softcapping (Gemma 2)
    (7, None, 1.5, True, True, -1),  # another ignore_index
])
def test_matches_transformers_loss_in_fp32(chunk_tokens, num_items, softcap, bias, weight_grad,
                                           ignore_index):
    hidden, weight, head_bias, labels = _inputs(ignore_index=ignore_index, bias=bias,
                                                weight_grad=weight_grad)
    tensors = (hidden, weight, head_bias)
    plain = _plain_loss(hidden, weight, head_bias, labels, softcap, num_items_in_batch=num_items,
                        ignore_index=ignore_index)
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens,
                                 ignore_index=ignore_index, num_items_in_batch=num_items,
                                 lm_head_bias=head_bias, final_logit_softcapping=softcap)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    # A factor on the loss must reach the gradients (backward scales the stored ones).
    ours_grads, plain_grads = _gradients(3 * ours, tensors), _gradients(3 * plain, tensors)
    assert len(ours_grads) == (3 if bias and weight_grad else 2 if weight_grad else 1)
    for ours_grad, plain_grad in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_no_gradient():
    hidden, weight, _, labels = _inputs()
    (grad,) = _gradients(chunked_cross_entropy(hidden, weight, labels, chunk_tokens=4), (hidden,))
    # Row t is scored against label t+1: the rows before an ignored label, and each sequence's last.
    assert grad[0, :3].abs().sum() == 0 and grad[2, 7:].abs().sum() == 0
    assert grad[1, -1].abs().sum() == 0
    assert grad[0, 3:10].abs().sum(dim=-1).min() > 0


def test_close_to_transformers_loss_in_bf16():
    hidden, weight, head_bias, labels = _inputs(dtype=torch.bfloat16, bias=True, weight_grad=True)
    tensors = (hidden, weight, head_bias)
    plain = _plain_loss(hidden, weight, head_bias, labels, softcap=2.0)
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=5, lm_head_bias=head_bias,
                                 final_logit_softcapping=2.0)
    errors = {"loss": ((ours - plain).abs() / plain.abs()).item()}
    for name, ours_grad, plain_grad in zip(("hidden", "weight", "bias"), _gradients(ours, tensors),
                                           _gradients(plain, tensors), strict=True):
        assert ours_grad.dtype == torch.bfloat16
        errors[name] = _relative_error(ours_grad, plain_grad)
    print("bf16 relative errors, chunked vs plain:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["loss"] < 1e-2
    assert max(errors["hidden"], errors["weight"], errors["bias"]) < 2e-2


def test_without_grad_only_the_loss_is_computed():
    hidden, weight, _, labels = _inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _plain_loss(hidden, weight, None, labels).detach())


def _tiny(kind):
    """Tiny random CausalLMs: llama, gpt_neox (untied head), gemma2 (softcapping), gptj (bias)."""
    from transformers import (AutoModelForCausalLM, Gemma2Config, GPTJConfig, GPTNeoXConfig,
                              LlamaConfig)

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    config = {
        "llama": lambda: LlamaConfig(**shape, num_key_value_heads=2),
        "gpt_neox": lambda: GPTNeoXConfig(**shape, tie_word_embeddings=False),
        # Softcap far below the logits' spread, so a loss that skipped it would differ.
        "gemma2": lambda: Gemma2Config(**shape, num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=0.1, attn_implementation="eager"),
        "gptj": lambda: GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                   n_positions=64, bos_token_id=0, eos_token_id=0),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "gptj":
        torch.nn.init.normal_(model.lm_head.bias)  # zero-initialised: make the bias count
    return model.eval()  # no dropout, so both models see the same computation


def _loss_and_gradients(model, **batch):
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    return output, {name: param.grad.clone() for name, param in model.named_parameters()
                    if param.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gemma2", "gptj"])
def test_patched_model_matches_unpatched(kind):
    plain = _tiny(kind)
    patched = copy.deepcopy(plain)
    assert patch_causal_lm(patched) and patch_causal_lm(patched)  # twice is harmless
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :5] = -100
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 num_items_in_batch=torch.tensor(30))

    plain_output, plain_grads = _loss_and_gradients(plain, **batch)
    patched_output, patched_grads = _loss_and_gradients(patched, **batch)
    torch.testing.assert_close(patched_output.loss, plain_output.loss, rtol=1e-6, atol=1e-6)
    assert patched_output.logits is None
    assert patched_grads.keys() == plain_grads.keys()  # the head is trainable here: its grad too
    for name, grad in plain_grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    as_tuple = patched(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain_output.loss, rtol=1e-6, atol=1e-6)
    assert all(item.shape[-1:] != (0,) for item in as_tuple if torch.is_tensor(item))

    with torch.no_grad():  # inference without labels: the model's own logits, untouched
        torch.testing.assert_close(patched(input_ids=input_ids).logits,
                                   plain(input_ids=input_ids).logits)
        generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(input_ids[:1], **generate),
                           plain.generate(input_ids[:1], **generate))


def test_architecture_it_does_not_know_is_left_alone():
    from transformers import GraniteConfig, GraniteForCausalLM

    # Granite divides its logits by logits_scaling: a chunked loss without it would be wrong.
    model = GraniteForCausalLM(GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             logits_scaling=4.0))
    assert patch_causal_lm(model) is False
    assert "forward" not in model.__dict__


def test_trainer_trains_and_evaluates_a_patched_peft_model_alike(tmp_path):
    """Through peft and Trainer (gradient accumulation passes num_items_in_batch; evaluation gets
    no logits back): the same losses, step by step, as without the patch."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    rows = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(2)).tolist()
    data = Dataset.from_dict({"input_ids": rows, "labels": [[-100] * 4 + row[4:] for row in rows]})
    losses = {}
    for patch in (False, True):
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(_tiny("llama"), lora)
        if patch:
            assert patch_causal_lm(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(patch)),
                                 per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                                 logging_steps=1, report_to="none", use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        history = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        losses[patch] = (history, trainer.evaluate()["eval_loss"])
    assert len(losses[True][0]) == 2
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-5)


@pytest.mark.slow
def test_embedded_model_in_4_bit_with_lora(embedded_model):
    from peft import LoraConfig, get_peft_model

    from engine.models import load_quantized_model

    base = load_quantized_model(str(embedded_model), "nf4", True, torch.float32, "cpu")
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    input_ids = torch.randint(0, base.config.vocab_size, (2, 24),
                              generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[:, :10] = -100
    plain_output, plain_grads = _loss_and_gradients(model, input_ids=input_ids, labels=labels)
    assert patch_causal_lm(model)
    patched_output, patched_grads = _loss_and_gradients(model, input_ids=input_ids, labels=labels)
    assert patched_output.logits is None
    torch.testing.assert_close(patched_output.loss, plain_output.loss, rtol=1e-5, atol=1e-5)
    assert plain_grads and patched_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("use_liger", [False, True])
def test_bf16_on_cuda(monkeypatch, use_liger):
    if use_liger:
        pytest.importorskip("liger_kernel")
    monkeypatch.setattr(chunked_loss, "_liger_installed", lambda: use_liger)
    hidden, weight, _, labels = _inputs(dtype=torch.bfloat16)
    hidden = hidden.detach().cuda().requires_grad_()
    weight, labels = weight.detach().cuda(), labels.cuda()
    plain = _plain_loss(hidden, weight, None, labels, softcap=2.0, num_items_in_batch=20)
    ours = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=5, num_items_in_batch=20,
                                 final_logit_softcapping=2.0)
    torch.testing.assert_close(ours, plain, rtol=1e-2, atol=1e-2)
    (ours_grad,), (plain_grad,) = _gradients(ours, (hidden,)), _gradients(plain, (hidden,))
    assert _relative_error(ours_grad, plain_grad) < 2e-2
