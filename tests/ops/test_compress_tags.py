"""Default output names of ``compress`` (and of ``quantize --bits 2/3/4``, which goes through it): no two methods
or settings share one, and none is a name ``quantize --bits 8/16`` writes."""

from __future__ import annotations

from embcompress.ops.compress import option_tag, output_tag
from embcompress.quant import TAGS


def test_every_method_and_setting_gets_its_own_tag() -> None:
    runs = [
        ("int8", None, {}), ("fp16", None, {}), ("lowbit", None, {}),
        ("lowbit", None, {"bits": 4, "refine": False}),  # quantize --bits 4
        ("lowbit", None, {"bits": 4, "refine": True}), ("lowbit", None, {"bits": 2, "refine": False}),
        ("lowbit", None, {"bits": 4, "group_size": 64}), ("lowbit", None, {"bits": 4, "scheme": "sym"}),
        ("lowbit", 1000, {}), ("lowbit", 1001, {}), ("lowbit", 1000, {"scheme": "sym"}),
        ("svd", None, {"rank": 8}), ("svd", None, {"reduction": 0.9}), ("svd", None, {"reduction": 0.905}),
        ("svd", None, {"reduction": 0.9, "algorithm": "randomized"}), ("svd+int8", 1000, {}), ("svd", 1000, {}),
        ("weighted", None, {"reduction": 0.9}), ("weighted", None, {"reduction": 0.9, "power": 0.5}),
        ("groupreduce", None, {"reduction": 0.9}), ("groupreduce", None, {"reduction": 0.9, "blocks": 4}),
    ]
    tags = [output_tag(method, budget, 20_000, options) for method, budget, options in runs]
    assert len(set(tags)) == len(tags), tags
    assert not set(tags) & set(TAGS.values())  # quantize's int8/fp16 cover every weight, compress only tables
    assert tags[:4] == ["int8-tables", "fp16-tables", "lowbit", "lowbit-4b"]
    assert output_tag("lowbit", None, 1, {"bits": 4, "refine": False, "scheme": "asym"}) == "lowbit-4b"  # defaults


def test_option_tag_forms() -> None:
    assert option_tag({"reduction": 0.9}) == "-r90"
    assert option_tag({"energy": 0.95, "rank": None}) == "-e95"
    assert option_tag({"refine": True, "bits": 2, "group_size": 16, "scheme": "sym"}) == "-2b-g16-refine-scheme_sym"
    assert option_tag({"blocks": 8, "rounds": 1}, {"blocks": 8, "rounds": 3}) == "-rounds1"
