"""Fast unit tests of the pure parts: parser, geometry, negotiation, EXIF decoding."""

from __future__ import annotations

import pytest

from berth.services.config import ImgProcessConfig
from berth.services.errors import BadRequest, InvalidParameter
from berth.services.exif import decode_common, decode_tag
from berth.services.imaging import GIF, HEIC, JPEG, PNG, TIFF, WEBP, probe
from berth.services.imgprocess import geometry, pipeline
from berth.services.imgprocess.app import pairs_from_json, plan_from_request
from berth.services.imgprocess.geometry import Target
from berth.services.imgprocess.negotiate import accepted, choose
from berth.services.imgprocess.params import (
    Canvas,
    Region,
    Resize,
    Watermark,
    color,
    encode_b64,
    parse,
    split_path,
)

from .images import jpeg, quadrants, stored_for_orientation


def test_upyun_example_parses() -> None:
    plan = parse("/fw/300/unsharp/true/quality/80/format/png")
    assert plan.resize == Resize("fw", 300)
    assert plan.unsharp and plan.quality == 80 and plan.format == "png"
    assert plan.strip and plan.autoorient  # defaults: metadata stripped, EXIF orientation applied


def test_last_occurrence_wins_and_order_does_not_matter() -> None:
    assert parse("/quality/50/fw/10/quality/70") == parse("/fw/10/quality/70")


@pytest.mark.parametrize(
    ("path", "resize"),
    [
        ("/fh/200", Resize("fh", 200)),
        ("/fwfh/300x200", Resize("fwfh", 300, 200)),
        ("/fwfh2/300x200", Resize("fwfh2", 300, 200)),
        ("/both/300x200", Resize("both", 300, 200)),
        ("/sq/300", Resize("sq", 300)),
        ("/max/200", Resize("max", 200)),
        ("/min/200", Resize("min", 200)),
        ("/scale/50", Resize("scale", 50)),
        ("/wscale/200", Resize("wscale", 200)),
        ("/hscale/1000", Resize("hscale", 1000)),
        ("/fp/200000", Resize("fp", 200000)),
        ("/fw/300/fh/200", Resize("fwfh", 300, 200)),
    ],
)
def test_resize_keys(path: str, resize: Resize) -> None:
    assert parse(path).resize == resize


def test_crop_clip_gravity_and_offsets() -> None:
    plan = parse("/crop/300x200a80s60/gravity/center/clip/0x0a10a10")
    assert plan.crop == Region(300, 200, 80, -60, "center")
    assert plan.clip == Region(0, 0, 10, 10, "northwest")


def test_colours_use_upyun_inverted_alpha() -> None:
    assert color("c", "FF0000") == (255, 0, 0, 255)
    assert color("c", "FF000000") == (255, 0, 0, 255)
    assert color("c", "00FF00FF") == (0, 255, 0, 0)
    plan = parse("/border/3x2/brdcolor/0000FF80/canvas/600x400a50a20/cvscolor/FFFFFF00")
    assert plan.border == (3, 2) and plan.brdcolor == (0, 0, 255, 127)
    assert plan.canvas == Canvas(600, 400, 50, 20) and plan.cvscolor == (255, 255, 255, 255)
    assert parse("/canvas/600x400").canvas == Canvas(600, 400)


def test_watermark_groups_keep_their_options() -> None:
    text = encode_b64("你好/berth")
    assert "/" not in text
    plan = parse(
        f"/watermark/text/{text}/size/20/color/FF0000/border/FFFFFF00/align/southeast"
        f"/fw/100/watermark/url/{encode_b64('/logo.png')}/opacity/50/margin/5x6"
    )
    first, second = plan.watermarks
    assert first == Watermark(
        "text", "你好/berth", align="southeast", size=20, color=(255, 0, 0, 255),
        border=(255, 255, 255, 255),
    )  # fmt: skip
    assert second == Watermark("image", "/logo.png", opacity=50, margin=(5, 6))
    assert plan.resize == Resize("fw", 100)
    # Outside a watermark group, `border` is the image border again.
    assert parse(f"/watermark/text/{text}/fw/10/border/3x3").border == (3, 3)


def test_other_keys() -> None:
    plan = parse(
        "/rotate/90/flip/left,right/gaussblur/5x2/roundrect/20/lossless/true/progressive/true"
        "/strip/false/noicc/true/exifswitch/true/gifto/true/compress/true/force/true/format/auto"
    )
    assert plan.rotate == 90 and plan.flip == "horizontal" and plan.gaussblur == (5, 2)
    assert plan.roundrect == 20 and plan.lossless and plan.progressive and not plan.strip
    assert plan.noicc and plan.exifswitch and plan.gifto and plan.compress and plan.force
    assert plan.format == "auto"
    assert parse("/rotate/360").rotate is None
    assert parse("/rotate/auto").autoorient
    assert not parse("/autoorient/false").autoorient
    assert parse("/flip/top,down").flip == "vertical"
    assert parse("/format/jpeg").format == "jpg"
    assert parse("") == parse("/")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/fw/abc", "fw"),
        ("/fw/0", "fw"),
        ("/fw/-5", "fw"),
        ("/fw/99999999", "fw"),
        ("/unknown/1", "unknown"),
        ("/fw", "fw"),
        ("/fw/300/quality", "quality"),
        ("/quality/0", "quality"),
        ("/quality/101", "quality"),
        ("/scale/0", "scale"),
        ("/fwfh/300", "fwfh"),
        ("/fwfh/300x", "fwfh"),
        ("/both/0x10", "both"),
        ("/fw/300/max/200", "max"),
        ("/gravity/north", "gravity"),
        ("/crop/10x10/gravity/up", "gravity"),
        ("/crop/10x10b5b5", "crop"),
        ("/rotate/361", "rotate"),
        ("/rotate/left", "rotate"),
        ("/flip/sideways", "flip"),
        ("/gaussblur/51x2", "gaussblur"),
        ("/gaussblur/5x0", "gaussblur"),
        ("/brdcolor/red", "brdcolor"),
        ("/cvscolor/FFFFF", "cvscolor"),
        ("/format/bmp", "format"),
        ("/lossless/yes", "lossless"),
        ("/watermark/image/abc", "watermark"),
        ("/watermark/text", "watermark"),
        ("/watermark/text/***", "watermark/text"),
        ("/watermark/url/aGk=/size/10", "size"),
        ("/watermark/text/aGk=/font/comic", "font"),
        ("/watermark/text/aGk=/opacity/101", "opacity"),
        ("/watermark/text/aGk=/align/middle", "align"),
        ("/watermark/text/aGk=/margin/10", "margin"),
        ("/align/north", "align"),
        (f"/watermark/text/{encode_b64('x' * 400)}/size/500", "size"),
    ],
)
def test_bad_parameters_name_the_key(path: str, key: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        parse(path)
    assert err.value.key == key
    assert err.value.status == 400


def test_split_path() -> None:
    assert split_path("/a/1/b/2/") == [("a", "1"), ("b", "2")]
    assert split_path("/watermark/text/aGk=/size/3") == [("watermark/text", "aGk="), ("size", "3")]


def test_plan_from_request_path_or_header() -> None:
    assert plan_from_request("/cat.jpg!/fw/300", None).resize == Resize("fw", 300)
    assert plan_from_request("/!/fw/300", None).resize == Resize("fw", 300)
    assert plan_from_request("/cat.jpg", "/fw/200").resize == Resize("fw", 200)
    assert plan_from_request("/cat.jpg", None).resize is None
    with pytest.raises(BadRequest):
        plan_from_request("/!/fw/300", "/fw/200")


def test_pipeline_json_goes_through_the_same_parser() -> None:
    pairs = pairs_from_json(
        [{"fw": 300}, {"unsharp": True}, {"watermark": {"text": "hi", "size": 12}}]
    )
    assert pairs == [
        ("fw", "300"),
        ("unsharp", "true"),
        ("watermark/text", encode_b64("hi")),
        ("size", "12"),
    ]
    assert pairs_from_json({"operations": {"fw": 1}}) == [("fw", "1")]
    for bad in ("fw", [["fw", 1]], [{"fw": 1, "fh": 2}], [{"fw": 1.5}], [{"watermark": "x"}]):
        with pytest.raises(InvalidParameter):
            pairs_from_json(bad)


# --- geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resize", "force", "size", "target"),
    [
        (Resize("fw", 300), False, (600, 400), Target(300, 200)),
        (Resize("fw", 900), False, (600, 400), None),  # no enlarging by default
        (Resize("fw", 900), True, (600, 400), Target(900, 600)),
        (Resize("fh", 100), False, (600, 400), Target(150, 100)),
        (Resize("fwfh", 300, 300), False, (600, 400), Target(300, 200)),
        (Resize("fwfh2", 300, 300), False, (600, 400), Target(450, 300)),
        (Resize("max", 300), False, (400, 600), Target(200, 300)),
        (Resize("min", 300), False, (400, 600), Target(300, 450)),
        (Resize("scale", 50), False, (600, 400), Target(300, 200, "stretch")),
        (Resize("scale", 200), False, (600, 400), Target(1200, 800, "stretch")),
        (Resize("wscale", 50), False, (600, 400), Target(300, 400, "stretch")),
        (Resize("hscale", 50), False, (600, 400), Target(600, 200, "stretch")),
        (Resize("both", 100, 100), False, (600, 400), Target(100, 100, "cover")),
        (Resize("both", 100, 100), True, (600, 400), Target(100, 100, "stretch")),
        (Resize("sq", 50), False, (600, 400), Target(50, 50, "cover")),
        (Resize("fp", 60000), False, (600, 400), Target(300, 200)),
        (Resize("fp", 600000), False, (600, 400), None),
    ],
)
def test_resize_target(
    resize: Resize, force: bool, size: tuple[int, int], target: Target | None
) -> None:
    assert geometry.resize_target(resize, force, *size) == target


def test_jpeg_shrink_leaves_at_least_the_target() -> None:
    assert geometry.jpeg_shrink(6000, 4000, Target(500, 333)) == 8
    assert geometry.jpeg_shrink(6000, 4000, Target(800, 533)) == 4
    assert geometry.jpeg_shrink(6000, 4000, Target(3000, 2000)) == 2
    assert geometry.jpeg_shrink(6000, 4000, Target(4000, 2667)) == 1
    # Covering 500x500 from 6000x4000 needs 750x500 before the crop.
    assert geometry.jpeg_shrink(6000, 4000, Target(500, 500, "cover")) == 8
    assert geometry.jpeg_shrink(6000, 4000, Target(600, 600, "cover")) == 4
    # libvips rounds a shrunk size down (and refuses 0): 5x3 at 1/4 would be 1x0.
    assert geometry.jpeg_shrink(5, 3, Target(1, 1)) == 2
    assert geometry.jpeg_shrink(1003, 1000, Target(251, 250)) == 2


def test_stored_target_swaps_sides_for_quarter_turns() -> None:
    assert geometry.stored_target(Target(80, 60), 6) == Target(60, 80)
    assert geometry.stored_target(Target(80, 60, "cover"), 8) == Target(60, 80, "cover")
    assert geometry.stored_target(Target(80, 60), 3) == Target(80, 60)


def test_the_source_streams_when_a_resize_comes_before_any_turn() -> None:
    config = ImgProcessConfig()
    upright = probe(bytes(quadrants(40, 30).pngsave_buffer()), config)
    sideways = probe(jpeg(stored_for_orientation(quadrants(40, 30), 6)), config)
    small = Target(20, 15)
    random = [
        (parse("/rotate/90"), upright, None),  # nothing shrinks it first
        (parse("/flip/top,down"), upright, None),
        (parse(""), sideways, None),
        (parse("/crop/10x10/fw/20"), sideways, None),  # the crop is in upright coordinates
        (parse("/fw/20"), sideways, None),
    ]
    for plan, found, target in random:
        assert pipeline.needs_random_access(plan, found, target), plan
    streams = [
        (parse("/fw/20/rotate/90"), upright, small),
        (parse("/fw/20/flip/top,down"), upright, small),
        (parse("/fw/20"), sideways, small),
        (parse("/fw/20/rotate/45"), sideways, small),
        (parse("/autoorient/false/crop/10x10/fw/20"), sideways, small),
        (parse("/flip/left,right"), upright, None),
    ]
    for plan, found, target in streams:
        assert not pipeline.needs_random_access(plan, found, target), plan


def test_region_box_gravity_and_clamping() -> None:
    assert geometry.region_box(Region(100, 50), 600, 400, "crop") == (0, 0, 100, 50)
    assert geometry.region_box(Region(100, 50, gravity="center"), 600, 400, "c") == (
        250, 175, 100, 50
    )  # fmt: skip
    assert geometry.region_box(Region(100, 50, gravity="southeast"), 600, 400, "c") == (
        500, 350, 100, 50
    )  # fmt: skip
    assert geometry.region_box(Region(100, 50, 10, -5, "center"), 600, 400, "c") == (
        260, 170, 100, 50
    )  # fmt: skip
    assert geometry.region_box(Region(0, 0, 100, 100), 600, 400, "c") == (100, 100, 500, 300)
    assert geometry.region_box(Region(1000, 1000, 550, 0), 600, 400, "c") == (550, 0, 50, 400)
    with pytest.raises(BadRequest):
        geometry.region_box(Region(10, 10, 700, 0), 600, 400, "crop")


# --- negotiation ------------------------------------------------------------------------


def test_accept_parsing_ignores_wildcards_and_q0() -> None:
    assert accepted("image/avif,image/webp;q=0.9,*/*;q=0.8") == {"image/avif", "image/webp"}
    assert accepted("image/avif;q=0, image/webp") == {"image/webp"}
    assert accepted(None) == set()


def test_choose_format() -> None:
    chrome = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"
    assert choose("auto", chrome, JPEG, False, False) == (choose("avif", None, JPEG, 0, 0)[0], True)
    assert choose("auto", "image/webp,*/*", JPEG, False, False)[0] is WEBP
    assert choose("auto", "*/*", PNG, True, False) == (PNG, True)
    assert choose("auto", chrome, GIF, False, True)[0] is WEBP  # animations never go to AVIF
    assert choose(None, chrome, GIF, False, True) == (GIF, False)
    assert choose(None, None, TIFF, False, False)[0] is JPEG
    assert choose(None, None, HEIC, True, False)[0] is PNG
    assert choose("png", chrome, JPEG, False, False) == (PNG, False)


# --- EXIF -------------------------------------------------------------------------------


def test_exif_tags_decode_to_json_values() -> None:
    assert decode_tag("Canon (Canon, ASCII, 6 components, 6 bytes)") == "Canon"
    assert decode_tag("6 (Right-top, Short, 1 components, 2 bytes)") == 6
    assert decode_tag("28/10 (f/2.8, Rational, 1 components, 8 bytes)") == 2.8
    assert decode_tag("1/1 2/1 30/1 (1, 2, 30, Rational, 3 components, 24 bytes)") == [1, 2, 30]
    assert decode_tag("0230 (Exif Version 2.3, Undefined, 4 components, 4 bytes)") == (
        "Exif Version 2.3"
    )
    assert decode_tag("plain") == "plain"
    fields = {"exif-ifd0-Make": "Berth (Berth, ASCII, 6 components, 6 bytes)", "other": "x"}
    assert decode_common(fields) == {"Make": "Berth"}


def test_cgroup_cpu_quota() -> None:
    from berth.services.config import cgroup_cpus

    assert cgroup_cpus("max 100000\n") is None
    assert cgroup_cpus("150000 100000") == 1.5
    assert cgroup_cpus("garbage") is None
