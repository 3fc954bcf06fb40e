"""The chunked next-token loss: equal to the full-logits loss, in value and gradients, without its memory."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.data.formats import IGNORE_INDEX
from pipeline.train.loss import (
    ChunkedCrossEntropy,
    full_token_loss_sum,
    shifted_targets,
    token_loss_sum,
)

B, S, H, V = 3, 17, 32, 1000
G = 0.37  # an upstream gradient != 1, as the loop's (world / label_tokens) scaling is


def make_labels(b: int = B, s: int = S) -> torch.Tensor:
    """About a third of the labels ignored, and one whole row (a prompt-only or padding row) ignored."""
    labels = torch.randint(0, V, (b, s))
    labels[torch.rand(b, s) < 0.35] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX
    return labels


def make_inputs(dtype=torch.float32):
    # logits of std ~3: a peaked softmax, as a trained LM head gives
    return torch.randn(B, S, H).to(dtype), (torch.randn(V, H) * 3 / H ** 0.5).to(dtype), torch.randn(V).to(dtype)


def losses_and_grads(hidden, weight, bias, labels, chunk=None, weight_grad=True):
    """(loss, grad hidden, grad weight, grad bias) of the chunked path (``chunk``) or the full path (None)."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    b = None if bias is None else bias.clone().requires_grad_()
    if chunk is None:
        loss = full_token_loss_sum(F.linear(h, w, b), labels)
    else:
        loss = token_loss_sum(h, labels, w, b, chunk=chunk)
    loss.backward(torch.tensor(G, dtype=loss.dtype))
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def close(actual, expected, rtol, scale_atol):
    """assert_close with an atol relative to the largest reference entry (see the callers for the numbers)."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=scale_atol * float(expected.abs().max()))


def test_shifted_targets():
    labels = torch.tensor([[1, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]])
    assert shifted_targets(labels).tolist() == [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]
    assert shifted_targets(labels).dtype == torch.long


@pytest.mark.parametrize("chunk, weight_grad, with_bias", [(1, True, True), (7, True, True), (64, True, True),
                                                            (10_000, True, True), (7, False, False), (64, True, False)])
def test_fp32_matches_full_path(chunk, weight_grad, with_bias):
    hidden, weight, bias = make_inputs()
    bias = bias if with_bias else None
    labels = make_labels()
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert 0 < n < B * (S - 1) and (chunk < n or chunk > n)
    got = losses_and_grads(hidden, weight, bias, labels, chunk, weight_grad)
    # The reference in float64 (of the same fp32 inputs): the fp32 full path is itself up to ~0.7e-6 of the
    # largest gradient entry away from exact, so comparing two fp32 results would test its noise as well.
    ref = losses_and_grads(hidden.double(), weight.double(), None if bias is None else bias.double(), labels,
                           weight_grad=weight_grad)
    torch.testing.assert_close(got[0], ref[0].float(), rtol=1e-6, atol=0.0)  # measured: 1.3e-7 relative
    # Gradients: rtol 1e-6, atol 4e-6 of the largest entry. Entries are sums of V = 1000 products with
    # cancellation; measured over 20 seeds the worst error is 1.8e-6 of the largest entry at chunk 1 (one-row
    # matmuls take another kernel than many-row ones), 0.7e-6 otherwise, the same as the fp32 full path's 0.7e-6.
    close(got[1], ref[1], 1e-6, 4e-6)
    if weight_grad:
        close(got[2], ref[2], 1e-6, 4e-6)
    else:
        assert got[2] is None
    if with_bias:
        close(got[3], ref[3], 1e-6, 4e-6)


def test_tied_embedding_weight():
    """The LM head is the input embedding: its gradient is the sum of both uses, as with the full path."""
    ids = torch.randint(0, V, (B, S))
    labels = make_labels()
    proj = torch.randn(H, H) / H ** 0.5

    def run(chunk, dtype):
        emb = torch.nn.Embedding(V, H, dtype=dtype)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(V, H, generator=torch.Generator().manual_seed(1)))
        hidden = torch.tanh(emb(ids) @ proj.to(dtype))  # a stand-in for the decoder
        if chunk is None:
            loss = full_token_loss_sum(hidden @ emb.weight.T, labels)
        else:
            loss = token_loss_sum(hidden, labels, emb.weight, chunk=chunk)
        loss.backward(torch.tensor(G, dtype=loss.dtype))
        return loss.detach(), emb.weight.grad

    ref_loss, ref_grad = run(None, torch.float64)
    for chunk in (5, 10_000):
        loss, grad = run(chunk, torch.float32)
        torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-6, atol=0.0)
        close(grad, ref_grad, 1e-6, 4e-6)  # a head gradient dropped or counted twice would be O(1) off


def test_bf16_close_to_full_bf16_path():
    hidden, weight, _ = make_inputs(torch.bfloat16)
    labels = make_labels()
    full = losses_and_grads(hidden, weight, None, labels)  # (h @ W.T).float() CE, autograd through bf16
    exact = losses_and_grads(hidden.double(), weight.double(), None, labels)
    for chunk in (1, 7, 10_000):
        got = losses_and_grads(hidden, weight, None, labels, chunk)
        # Loss: the chunks' bf16 logits are the full path's, the fp32 CE differs only in summation order.
        # Measured 2e-7 relative (20 seeds); the bf16 path itself is 4e-4 from exact.
        torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=0.0)
        # grad hidden: the same bf16 matmul of the same bf16-cast logits gradient, row by row; measured: a rare
        # entry one bf16 ulp off (largest difference 1.3e-6 of the largest entry). 2 ulps (2^-7) + 1e-5 allowed.
        close(got[1], full[1], 2 ** -7, 1e-5)
        if chunk >= 10_000:  # one chunk: one matmul, as the full path; measured 5e-5 of the largest entry
            close(got[2], full[2], 2 ** -7, 2e-4)
        else:
            # Several chunks: each chunk's [V, H] product is rounded to bf16 before the fp32 sum, an error of the
            # size of the full path's own rounding (up to 7e-3 of the largest entry apart). So the bound is
            # against exact: no further from it than the full bf16 path is (measured ratio <= 1.11 in 30 seeds).
            err_got = (got[2].double() - exact[2]).norm()
            err_full = (full[2].double() - exact[2]).norm()
            assert err_got <= 1.5 * err_full, (err_got, err_full)


def test_all_labels_ignored():
    hidden = torch.randn(B, S, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.full((B, S), IGNORE_INDEX)
    labels[:, 0] = 7  # a label on the first position has no position before it to predict it
    loss = token_loss_sum(hidden, labels, weight, chunk=4)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape and not hidden.grad.any()
    assert weight.grad is not None and not weight.grad.any()


def test_ignored_targets_inside_function():
    """Rows whose target is IGNORE_INDEX add nothing, even when the caller did not select them away."""
    h = torch.randn(6, H, requires_grad=True)
    weight = torch.randn(V, H)
    targets = torch.tensor([3, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, 0])
    loss = ChunkedCrossEntropy.apply(h, weight, None, targets, 4, None)
    ref = F.cross_entropy(h @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0.0)
    loss.backward()
    assert not h.grad[targets == IGNORE_INDEX].any() and h.grad[targets != IGNORE_INDEX].abs().sum(1).all()


class AllocationProbe(TorchDispatchMode):
    """Records the shape of every fp32 tensor an op allocates (views and in-place results are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for r, t in zip(returns, out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and r.alias_info is None:
                self.shapes.append(tuple(t.shape))
        return out

    def largest(self, *, besides: tuple[int, ...] = ()) -> int:
        return max(torch.Size(s).numel() for s in self.shapes if s != besides)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_never_allocates_full_logits(weight_grad):
    hidden, weight, bias = make_inputs()
    labels = make_labels()
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    chunk = 8
    assert chunk * V < n * V

    def run(chunked: bool) -> AllocationProbe:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
        b = bias.clone().requires_grad_()
        with AllocationProbe() as probe:
            loss = token_loss_sum(h, labels, w, b, chunk) if chunked else full_token_loss_sum(F.linear(h, w, b), labels)
            loss.backward()
        assert h.grad is not None and (w.grad is not None) == weight_grad
        return probe

    # The weight's own [V, H] gradient is the one vocabulary-sized tensor any path must make; it is left out.
    full = run(chunked=False)
    assert full.largest(besides=(V, H)) >= n * V  # the probe sees the full path's logits
    chunked = run(chunked=True)
    assert chunked.largest(besides=(V, H)) <= chunk * V
    assert (V, H) in chunked.shapes if weight_grad else True


class CountingGather:
    """A ``gather`` that counts its entries and, like ZeRO-3, leaves the weight an empty partition outside them;
    the gathered buffer is poisoned (NaN) on exit, as ZeRO-3 frees it, so values kept from forward show up."""

    def __init__(self, param: torch.nn.Parameter):
        self.param, self.master = param, param.data.clone()
        self.entries = 0
        param.data = torch.empty(0, dtype=param.dtype)

    @contextlib.contextmanager
    def __call__(self):
        self.entries += 1
        self.param.data = self.master.clone()
        try:
            yield
        finally:
            self.param.data.fill_(float("nan"))
            self.param.data = torch.empty(0, dtype=self.param.dtype)


@pytest.mark.parametrize("chunk", [3, 10_000])
def test_gather_entered_in_forward_and_backward(chunk):
    """Once per pass, whatever the number of chunks; backward gets the weight's values from gather, not from
    forward (a frozen head, as LoRA has it: the weight is an empty partition outside gather, as under ZeRO-3)."""
    hidden, weight, _ = make_inputs()
    labels = make_labels()
    ref = losses_and_grads(hidden, weight, None, labels, weight_grad=False)
    head = torch.nn.Parameter(weight.clone(), requires_grad=False)
    gather = CountingGather(head)
    h = hidden.clone().requires_grad_()
    loss = token_loss_sum(h, labels, head, chunk=chunk, gather=gather)
    assert gather.entries == 1 and head.numel() == 0
    loss.backward(torch.tensor(G))
    assert gather.entries == 2
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=0.0)
    close(h.grad, ref[1], 1e-6, 4e-6)


def test_gather_entered_with_no_labelled_tokens():
    """A rank whose micro-batch has no label still enters gather in both passes (ZeRO-3 gathers collectively)."""
    head = torch.nn.Parameter(torch.randn(V, H), requires_grad=False)
    gather = CountingGather(head)
    h = torch.randn(B, S, H, requires_grad=True)
    loss = token_loss_sum(h, torch.full((B, S), IGNORE_INDEX), head, chunk=4, gather=gather)
    loss.backward()
    assert gather.entries == 2 and loss.item() == 0.0 and not h.grad.any()


def test_rejects_bad_arguments():
    h, w = torch.randn(4, H), torch.randn(V, H)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk"):
        ChunkedCrossEntropy.apply(h, w, None, t, 0, None)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        ChunkedCrossEntropy.apply(h, w.bfloat16(), None, t, 2, None)
