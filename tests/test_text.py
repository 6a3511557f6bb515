"""Per-template embeddings and the averaged / expert classifiers built from them."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from floss.core.classes import query_names
from floss.core.templates import IMAGENET_TEMPLATES
from floss.core.text import averaged_classifier, expand_experts_to_queries, expert_classifiers, template_embeddings

D = 8


class FakeEncoder:
    """Deterministic, unnormalised 'text features' per prompt; records batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        rows = [torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) * 3 for p in prompts]
        return torch.stack(rows)


def test_template_embeddings_shape_order_and_norm():
    enc = FakeEncoder()
    names = ["road", "traffic light", "sky"]
    emb = template_embeddings(enc, names, batch_size=50)
    assert emb.shape == (80, 3, D) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(80, 3))
    for m, q in [(0, 0), (41, 1), (79, 2)]:
        ref = F.normalize(FakeEncoder()([IMAGENET_TEMPLATES[m].format(names[q])]), dim=-1)[0]
        torch.testing.assert_close(emb[m, q], ref)
    assert enc.calls == [50] * 4 + [40]
    torch.testing.assert_close(template_embeddings(FakeEncoder(), names, batch_size=7), emb)
    sub = template_embeddings(FakeEncoder(), names, templates=IMAGENET_TEMPLATES[:2])
    torch.testing.assert_close(sub, emb[:2])


@pytest.mark.parametrize("bad_output, match", [
    (lambda p: torch.zeros(len(p), D), "zero embedding"),
    (lambda p: torch.full((len(p), D), float("nan")), "NaN"),
    (lambda p: torch.ones(len(p) + 1, D), "expected shape"),
    (lambda p: torch.ones(len(p)), "2-d"),
    (lambda p: [[1.0] * D] * len(p), "torch.Tensor"),
    (lambda p: torch.ones(len(p), D, dtype=torch.long), "floating"),
])
def test_template_embeddings_rejects_bad_encoder_output(bad_output, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        template_embeddings(bad_output, ["road"])
    assert "encode_text" in str(err.value)


def test_template_embeddings_bad_arguments():
    with pytest.raises(TypeError, match="names"):
        template_embeddings(FakeEncoder(), "road")
    with pytest.raises(ValueError, match="names"):
        template_embeddings(FakeEncoder(), [])
    with pytest.raises(ValueError, match="templates\\[0\\]"):
        template_embeddings(FakeEncoder(), ["road"], templates=["no placeholder"])
    with pytest.raises(ValueError, match="batch_size"):
        template_embeddings(FakeEncoder(), ["road"], batch_size=0)
    with pytest.raises(TypeError, match="encode_text"):
        template_embeddings(None, ["road"])


@pytest.fixture
def emb():
    return F.normalize(torch.randn(80, 5, D, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_averaged_classifier(emb):
    torch.testing.assert_close(averaged_classifier(emb), F.normalize(emb.mean(0), dim=-1))
    plain = averaged_classifier(emb, renormalize=False)
    torch.testing.assert_close(plain, emb.mean(0))
    assert bool((plain.norm(dim=-1) < 1).all())
    torch.testing.assert_close(averaged_classifier(emb, templates=[3, 9]), F.normalize(emb[[3, 9]].mean(0), dim=-1))
    with pytest.raises(ValueError, match="templates"):
        averaged_classifier(emb, templates=[80])
    with pytest.raises(ValueError, match="emb"):
        averaged_classifier(emb[0])
    with pytest.raises(TypeError, match="renormalize"):
        averaged_classifier(emb, renormalize=1)


def test_expert_classifiers_definition(emb):
    experts = [[66, 9, 54, 2], [0], [1, 2, 3, 4], [79, 78], [5, 6, 7, 8]]
    out = expert_classifiers(emb, experts, renormalize=False)
    assert out.shape == (5, 5, D)
    for k, ids in enumerate(experts):
        for j in range(5):  # e_j^(k) = mean over the experts of class k of the template embeddings of class j
            torch.testing.assert_close(out[k, j], torch.stack([emb[m, j] for m in ids]).mean(0))
    torch.testing.assert_close(expert_classifiers(emb, experts), F.normalize(out, dim=-1))
    # all 80 templates as one expert = the averaged classifier
    torch.testing.assert_close(expert_classifiers(emb, [list(range(80))])[0], averaged_classifier(emb))


def test_expert_classifiers_errors(emb):
    with pytest.raises(ValueError, match=r"experts\[1\]"):
        expert_classifiers(emb, [[0], [80]])
    with pytest.raises(ValueError, match=r"experts\[0\].*duplicates"):
        expert_classifiers(emb, [[1, 1]])
    with pytest.raises(ValueError, match=r"experts\[0\].*empty"):
        expert_classifiers(emb, [[]])
    with pytest.raises(ValueError, match="experts"):
        expert_classifiers(emb, [])
    with pytest.raises(ValueError, match="emb"):
        expert_classifiers(emb.long(), [[0]])


def test_expand_experts_to_queries_naclip_voc20():
    queries, query_to_class = query_names("pascalvoc20", "naclip")
    per_class = [[k, k + 20, k + 40, k + 60] for k in range(20)]
    per_query = expand_experts_to_queries(per_class, query_to_class)
    assert len(per_query) == 30
    assert per_query[queries.index("ship")] == per_class[3]
    assert per_query[queries.index("person in skirt")] == per_class[14]
    assert per_query[queries.index("screen")] == per_class[19]
    with pytest.raises(ValueError, match="query_to_class.*classes \\[1\\]"):
        expand_experts_to_queries([[0], [1]], [0, 0])
    with pytest.raises(ValueError, match="query_to_class"):
        expand_experts_to_queries([[0], [1]], [0, 2])
