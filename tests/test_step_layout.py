"""The TiDAR step structure equals the rules of DESIGN.md section 2 on every (query, key) pair."""

import pytest
import torch

from rollout.step_layout import decode_layout, prefill_layout


def tokens_of(k, levels):
    """In-step tokens in layout order: ("draft", i) then ("mask", level, slot)."""
    return [("draft", i) for i in range(k)] + [("mask", j, m) for j in levels for m in range(k)]


def reference_visible(query, key) -> bool:
    if query[0] == "draft":
        return key[0] == "draft" and key[1] <= query[1]  # drafts: causal, never see masks
    if key[0] == "draft":
        return key[1] < query[1]  # block at level j sees d_0..d_{j-1}
    return key[1] == query[1]  # bidirectional inside its own block only


@pytest.mark.parametrize("k,levels", [(4, (1, 2, 3, 4)), (4, (1, 3)), (8, (1, 2, 4, 8)), (16, (1,)), (3, ())])
def test_decode_layout_follows_the_rules(k, levels):
    layout = decode_layout(k, levels)
    toks = tokens_of(k, levels)
    assert layout.num_tokens == len(toks) and layout.num_drafts == k
    for qi, q in enumerate(toks):
        expected_offset = q[1] if q[0] == "draft" else q[1] + q[2]
        assert int(layout.offsets[qi]) == expected_offset
        for ki, key in enumerate(toks):
            assert bool(layout.visible[qi, ki]) == reference_visible(q, key), (q, key)
    for b in range(len(levels)):
        assert toks[layout.block_start(b)] == ("mask", levels[b], 0)


def test_prefill_layout_pads_are_isolated_and_the_block_sees_the_prompt():
    positions, visible, write = prefill_layout([3, 5], 4)
    T = 5 + 4
    assert positions.shape == (2, T)
    assert positions[0].tolist() == [0, 1, 2, 0, 0, 3, 4, 5, 6]
    assert write[0].tolist() == [True] * 3 + [False] * 6
    assert visible[0, 3].tolist() == [False, False, False, True] + [False] * 5
    for b, n in enumerate((3, 5)):
        assert torch.equal(visible[b, :n, :n], torch.ones(n, n, dtype=torch.bool).tril())
        assert visible[b, 5:, :n].all() and visible[b, 5:, 5:].all()
        assert not visible[b, 5:, n:5].any()
        assert not visible[b, :5, 5:].any()
