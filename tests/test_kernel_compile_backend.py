"""backend="compile": torch.compile of each op's PyTorch reference (the baseline the benches time the
kernels against, and ``train.kernels=compile``) computes what the reference computes."""

import pytest
import torch

from diga_fast.kernels import (
    assign_centroids,
    class_feature_sums,
    consensus_cross_entropy,
    crdomix_blend,
    default_backend,
)


@pytest.mark.slow
def test_compiled_references_match_the_eager_ones():
    torch.manual_seed(0)
    features, centroids = torch.randn(2, 16, 9, 11), torch.randn(19, 16)
    labels = torch.randint(0, 19, (2, 9, 11))
    for metric in ("cosine", "l2"):
        eager, compiled = (assign_centroids(features, centroids, metric, backend=b) for b in ("torch", "compile"))
        assert torch.equal(eager[0], compiled[0])
        torch.testing.assert_close(eager[1], compiled[1], rtol=1e-5, atol=1e-5)
    eager, compiled = (class_feature_sums(features, labels, 19, backend=b) for b in ("torch", "compile"))
    assert torch.equal(eager[1], compiled[1])
    torch.testing.assert_close(eager[0], compiled[0], rtol=1e-5, atol=1e-5)
    image, selected = torch.rand(2, 3, 9, 11), torch.rand(2, 256) < 0.5
    assert torch.equal(crdomix_blend(image, 1 - image, labels, selected, backend="torch"),
                       crdomix_blend(image, 1 - image, labels, selected, backend="compile"))
    results = []
    for backend in ("torch", None):
        logits = torch.randn(2, 19, 9, 11, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with default_backend("compile"):  # None resolves to the backend in force
            loss = consensus_cross_entropy(logits, labels, labels, backend=backend)
        results.append((loss, torch.autograd.grad(loss, logits)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
