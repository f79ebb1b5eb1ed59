"""The source's resources in the infotext keys image sites read, and every key readable by image browsers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lib_delta.args import MAX_GROUPS, AdaptationGroup, ControlNetUnit, DeltaSettings, parse_lora_tags
from lib_delta.fields import Groups, walk
from lib_delta.hosts.common import credits
from lib_delta.hosts.common.credits import Credits

ROOT = Path(__file__).resolve().parent.parent
OURS = Credits(checkpoints=(("sd15-base", "4818e607da"),), loras=(("style", "8d4cc4be5bc4"), ("ink", "0123456789ab")))

# sd-webui-infinite-image-browsing's infotext parser (zanllp/sd-webui-infinite-image-browsing, scripts/iib/tool.py
# @ 7d49900dc4a168a60a95fa754621e6b4fda8edcf, ``re_param_code``): a key is word characters and spaces only.
IIB_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\"[^,]|\\"|\\|[^\"])+"|[^,]*)(?:,|$)')
IIB_KEY = re.compile(r"[\w ]+")


def quote(text: str) -> str:
    """The WebUI's infotext_utils.quote (AUTOMATIC1111 1.10, Forge, Neo alike)."""
    return json.dumps(text, ensure_ascii=False) if any(c in str(text) for c in ",\n:") else text


def line(params: dict) -> str:
    """The WebUI's create_infotext rule for one parameters line."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def hashes_of(params: dict) -> dict:
    entries = [k for k in params if k.startswith("Hashes: ")]
    assert len(entries) == 1 and params[entries[0]] == entries[0], params
    return json.loads(entries[0][len("Hashes: "):])


def test_lora_hashes_merge_keeps_the_webuis_entries():
    webui = {"Steps": "4", "Lora hashes": "style: aaaaaaaaaaaa, detail: bbbbbbbbbbbb"}
    out = OURS.into(webui)
    assert credits.parse_lora_hashes(out["Lora hashes"]) == {
        "style": "aaaaaaaaaaaa", "detail": "bbbbbbbbbbbb", "ink": "0123456789ab"}
    assert webui["Lora hashes"] == "style: aaaaaaaaaaaa, detail: bbbbbbbbbbbb"  # a copy: X/Y/Z cells share the dict


def test_hashes_json_merges_other_writers_and_is_written_unquoted():
    other = {"Hashes": json.dumps({"model": "ffffffffff", "lora:style": "cccccccccccc"})}
    out = OURS.into(other)
    assert "Hashes" not in out
    assert hashes_of(out) == {"model": "ffffffffff", "lora:style": "cccccccccccc", "model:sd15-base": "4818e607da",
                              "lora:ink": "0123456789ab"}  # theirs kept; "model" stays the target's
    text = line(out)
    # what Civitai's site reads (``/, Hashes:\s*({[^}]+})/``) and the Civitai extension merges into
    found = re.search(r", Hashes:\s*(\{[^}]+\})", ", " + text)
    assert found and json.loads(found.group(1)) == hashes_of(out), text


def test_merging_again_changes_nothing():
    once = OURS.into({"Lora hashes": "style: aaaaaaaaaaaa"})
    # a later pass: the WebUI rewrote its own key (hires fix), ours are merged once more
    twice = OURS.into({**once, "Lora hashes": "style: aaaaaaaaaaaa"})
    assert twice == once and line(twice) == line(once)


def test_nothing_to_credit_changes_nothing():
    assert Credits().into({"Steps": "4"}) == {"Steps": "4"}


def test_a_resource_without_hash_is_left_out():
    class Info:
        model_name, shorthash = "base", None

        def calculate_shorthash(self):  # hashing switched off (--no-hashing)
            return None

    class Entry:
        shorthash = "abcdefabcdef"

    got = credits.gather({"base": Info()}, {"a:b,c": Entry()})
    assert got == Credits((), (("abc", "abcdefabcdef"),))  # ":" and "," go, as the WebUI strips them


# --- keys readable by image browsers ---------------------------------------------------------------------------


def declared_keys() -> set[str]:
    keys = set()
    for s in walk(DeltaSettings):
        if s.infotext is None:
            continue
        if isinstance(s.kind, Groups):
            keys |= {s.infotext.key.format(i=i) for i in range(2, MAX_GROUPS + 1)}
        else:
            keys.add(s.infotext.key)
    return keys


def host_written_keys() -> set[str]:
    """Keys the hosts write themselves (notes such as "Delta refiner"), found in the source so none is missed."""
    keys = set()
    for path in (ROOT / "lib_delta").rglob("*.py"):
        keys |= set(re.findall(r'extra_generation_params\[\s*"([^"]+)"\s*\]', path.read_text()))
    return keys


def test_every_key_the_extension_writes_is_a_key_image_browsers_read():
    keys = declared_keys() | host_written_keys() | {credits.LORA_HASHES, credits.HASHES}
    assert {"Delta source", "Delta lambda", "Delta group 2", "Delta refiner"} <= keys  # the scan finds them
    bad = sorted(k for k in keys if not IIB_KEY.fullmatch(k))
    assert not bad, bad


def test_a_full_infotext_parses_back_key_by_key_in_an_image_browser():
    group = AdaptationGroup(loras=parse_lora_tags("<lora:style:0.8><lora:ink:0.5:1>"), checkpoint="tuned",
                            prompt="in the snow, at night", strength=0.75, schedule="cosine", start=0.1, end=0.8,
                            controlnets=(ControlNetUnit(model="canny [abc]", module="canny", weight=0.5),))
    settings = DeltaSettings(enabled=True, source="sd15-base [4818e607da]", mode="delta", cfg_mode="cond",
                             trajectory="separate", source_cfg=6.5,
                             groups=(group, AdaptationGroup(prompt="watercolor", strength=-0.5)))
    params = OURS.into({"Steps": "20", "Sampler": "Euler", **settings.to_infotext(), "Version": "1.10.1"})
    found = dict(IIB_PARAM.findall(line(params)))
    expected = {k for k in params if not k.startswith("Hashes: ")} | {"Hashes"}
    assert expected <= set(found), sorted(expected - set(found))
    assert found["Delta lambda"] == "0.75" and found["Version"] == "1.10.1"  # nothing swallowed its neighbour
