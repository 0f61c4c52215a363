"""The HTML report: escaping of model text, bounded size, colours, the CLI, and a headless-Chromium load."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from test_plots import LR, make_tokens, write_metrics_run, write_token_run
from typer.testing import CliRunner

from entropy_lens import report as rep

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)

EVIL = ["<script>alert(1)</script>", '" onmouseover="alert(2)', "' onclick='x'", "a & b <b>bold</b>", "\n", " x"]


class Page(HTMLParser):
    """Collects tags, attributes and the text of token spans."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.spans: list[str] = []
        self._in_span = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "span" and "t" in (a.get("class") or "").split():
            self._in_span = 1
            self._buf = []

    def handle_endtag(self, tag):
        if tag == "span" and self._in_span:
            self._in_span = 0
            self.spans.append("".join(self._buf))

    def handle_data(self, data):
        if self._in_span:
            self._buf.append(data)


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    return p


def evil_frame():
    df, summary = make_tokens(texts=EVIL)
    return df, summary


def test_model_text_is_escaped():
    df, summary = evil_frame()
    summary["notes"] = ['<img src=x onerror="alert(3)">']
    page = rep.build_report(df, summary, title="<b>run</b>", max_responses=8, max_tokens=50)
    # raw markup from the model never appears; its escaped form does
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # (quotes as markupsafe writes them: " → &#34;, ' → &#39;)
    assert '" onmouseover=' not in page and "&#34; onmouseover=&#34;alert(2)" in page
    assert "&#39; onclick=&#39;x&#39;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=&#34;alert(3)&#34;&gt;" in page
    assert "<b>run</b>" not in page and "<b>bold</b>" not in page
    p = parse(page)
    # exactly one script element (the page's own), no event-handler attributes anywhere
    assert [t for t, _ in p.tags].count("script") == 1
    assert not [(t, k) for t, a in p.tags for k in a if k.lower().startswith("on")]
    assert "b" not in [t for t, _ in p.tags]  # no <b> from the model text or the title
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in p.tags if t == "img")
    # the browser-visible text of every token span is exactly the model's token text
    shown = df.sort_values(["sample", "pos"])
    assert set(p.spans) <= set(EVIL) and set(EVIL) <= set(p.spans)
    assert len(p.spans) == len(shown)


def test_page_is_self_contained_and_locked_down():
    df, summary = make_tokens()
    page = rep.build_report(df, summary, figures=[("fig", "caption", b"\x89PNG fake")])
    assert "://" not in page  # no URL of any kind: nothing is fetched
    assert "default-src 'none'" in page and "script-src 'sha256-" in page
    p = parse(page)
    assert [a.get("src", "")[:22] for t, a in p.tags if t == "img"] == ["data:image/png;base64,"]
    assert not [t for t, a in p.tags if t in ("link", "iframe", "object", "embed")]


def test_size_is_bounded():
    df, summary = make_tokens(B=40, T=12)
    page = rep.build_report(df, summary, max_responses=5, max_tokens=3, seed=1)
    p = parse(page)
    resp = [a for t, a in p.tags if t == "div" and "resp" in (a.get("class") or "").split()]
    assert len(resp) == 5 and len(p.spans) == 15
    assert "more tokens not shown" in page
    big = rep.build_report(df, summary, max_responses=40, max_tokens=400)
    assert len(parse(big).spans) == len(df)
    assert rep.sample_ids(df, 5, seed=1) == rep.sample_ids(df, 5, seed=1) != rep.sample_ids(df, 5, seed=2)


def test_colour_modes_and_tooltips():
    df, summary = make_tokens()
    modes = rep.colour_modes(df, LR, summary["n_tokens"])
    assert [m.key for m in modes] == [
        "dh_measured",
        "omega_paper",
        "omega_code",
        "dh_all_logit",
        "dh_cov",
        "dh_jvp",
        "entropy",
    ]
    c = rep.token_colours(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, np.nan]), 1.0, True)
    assert c[2] == c[5] == "#ffffff" and c[0] == c[1]  # saturates at the scale; NaN is white
    assert c[4] != c[1] and int(c[4][1:3], 16) > int(c[4][5:7], 16)  # positive = red, negative = blue
    assert int(c[1][5:7], 16) > int(c[1][1:3], 16)
    page = rep.build_report(df, summary, max_responses=2)
    p = parse(page)
    options = [a for t, a in p.tags if t == "option"]
    spans = [a for t, a in p.tags if t == "span" and "t" in (a.get("class") or "").split()]
    assert len(options) == len(modes)
    assert all(len(a["data-c"].split(",")) == len(modes) for a in spans)
    tip = spans[0]["title"]
    for key in ("p = ", "H = ", "nats", "A = ", "Ω = ", "ΔH measured", "quadrant Q"):
        assert key in tip
    # analyze-style frame (no measured ΔH, no summary): the modes shrink, the page still builds
    bare = df.drop(columns=["dh_measured", "dh_jvp"])
    assert [m.key for m in rep.colour_modes(bare, None, None)] == ["omega_paper", "dh_all_logit", "dh_cov", "entropy"]
    assert 'span class="t"' in rep.build_report(bare)
    # no quadrant column: computed from logp, entropy and adv
    page = rep.build_report(df.drop(columns="quadrant"), summary)
    qs = {a["data-q"] for t, a in parse(page).tags if t == "span" and a.get("class") == "t"}
    assert qs == {str(q) for q in df["quadrant"].unique()}


def test_build_report_rejects_bad_frames():
    df, _ = make_tokens()
    with pytest.raises(ValueError, match="lack column"):
        rep.build_report(df.drop(columns="entropy"))
    with pytest.raises(ValueError, match="no rows"):
        rep.build_report(df.iloc[:0])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from entropy_lens_cli.report_cmd import register

    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)
    return app


def test_report_cli_writes_one_page(tmp_path):
    d = write_token_run(tmp_path / "run", texts=EVIL)
    res = runner.invoke(_app(), ["report", str(d), "--max-responses", "3"])
    assert res.exit_code == 0, res.output
    page = (d / "report.html").read_text(encoding="utf-8")
    p = parse(page)
    figs = [a["id"] for t, a in p.tags if t == "figure"]
    assert {"fig-dh_scatter", "fig-dh_vs_prob", "fig-quadrants", "fig-weight_dist", "fig-factor_matrix"} <= set(figs)
    assert "methods compared offline" in page and "ΔH estimators vs the measured change" in page
    assert len([a for t, a in p.tags if t == "div" and a.get("class") == "resp"]) == 3
    assert len(page.encode()) < 3_000_000
    out = tmp_path / "elsewhere" / "r.html"
    res = runner.invoke(_app(), ["report", str(d), "-o", str(out), "--no-figures"])
    assert res.exit_code == 0 and out.is_file() and "<figure" not in out.read_text()


def test_report_cli_bad_input(tmp_path):
    m = write_metrics_run(tmp_path / "train", "grpo", 0)
    res = runner.invoke(_app(), ["report", str(m)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "no tokens.parquet" in res.output
    assert not (m / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(_app(), ["report", str(empty)])
    assert res.exit_code == 2 and "no run files" in res.output
    res = runner.invoke(_app(), ["report", str(m), "--max-responses", "0"])
    assert res.exit_code == 2 and "--max-responses" in res.output
    d = write_token_run(tmp_path / "nocol", with_compare=False)
    import pandas as pd

    pd.read_parquet(d / "tokens.parquet").drop(columns="entropy").to_parquet(d / "tokens.parquet")
    res = runner.invoke(_app(), ["report", str(d)])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "tokens.parquet: tokens lack column(s) entropy" in res.output and not (d / "report.html").exists()


# --------------------------------------------------------------------------------------------
# Headless Chromium: the page loads, the script runs without errors, the token spans exist
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_loads_in_headless_chromium(tmp_path):
    df, summary = evil_frame()
    page = rep.build_report(
        df, summary, max_responses=8, max_tokens=50, figures=[("tiny", "a 1×1 PNG", _one_pixel_png())]
    )
    f = tmp_path / "report.html"
    f.write_text(page, encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        f.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = parse(proc.stdout)
    body = [a for t, a in dom.tags if t == "body"][0]
    # the page's script ran to the end (it sets data-ready to the number of token spans) with no error
    assert "data-error" not in body, body.get("data-error")
    assert body.get("data-ready") == str(len(df)), (body, proc.stderr[-2000:])
    assert body.get("data-mode") == "0"
    assert len(dom.spans) == len(df) and set(dom.spans) == set(EVIL)
    # no script but the page's own, no event-handler attribute made it into the DOM
    assert [t for t, _ in dom.tags].count("script") == 1
    assert not [(t, k) for t, a in dom.tags for k in a if k.lower().startswith("on")]
    # the script coloured every span (inline style rewritten by the script as rgb())
    spans = [a for t, a in dom.tags if t == "span" and a.get("class") == "t"]
    assert all("background-color" in a.get("style", "") for a in spans)
    console_errors = [
        ln
        for ln in proc.stderr.splitlines()
        if ("CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln))
        or "Content Security Policy" in ln
        or "Refused to" in ln
    ]
    assert not console_errors, console_errors


def _one_pixel_png() -> bytes:
    from matplotlib.figure import Figure

    from entropy_lens.plots import figure_png

    return figure_png(Figure(figsize=(0.1, 0.1)), dpi=10)


def test_report_json_safe_for_summary_values():
    # summary values of any JSON type (null, nested) render without error
    df, summary = make_tokens()
    summary["retokenized"] = None
    summary["model"] = json.dumps({"a": [1, 2]})
    page = rep.build_report(df, summary)
    assert "{&#34;a&#34;: [1, 2]}" in page


# --------------------------------------------------------------------------------------------
# The template: autoescaping on, strict undefined, hostile text in every field, the CSP
# --------------------------------------------------------------------------------------------

HOSTILE = [
    "<script>alert(7)</script>",
    '"><img src=x onerror=alert(8)>',
    "{{ 7*7 }}",
    "{% raw %}",
    "{{ title }}{# c #}",
    "</span></div><b>x</b>",
]


class Text(HTMLParser):
    """The decoded text of the page, and of the elements with a given tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.by_tag: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data):
        for tag in set(self.stack):
            self.by_tag.setdefault(tag, []).append(data)


def page_text(page: str) -> dict[str, str]:
    t = Text()
    t.feed(page)
    return {tag: "".join(parts) for tag, parts in t.by_tag.items()}


def hostile_page() -> str:
    import pandas as pd

    df, summary = make_tokens(texts=HOSTILE)
    summary["notes"] = HOSTILE
    summary["model"] = HOSTILE[1]
    summary["settings"]["optimizer"] = HOSTILE[2]
    compare = {
        "lr": HOSTILE[3],
        "estimators": ["omega_paper"],
        "methods": {h: {"factors": [h], "touched_share": 0.5, "predicted_dh": {"omega_paper": 1e-3}} for h in HOSTILE},
    }
    metrics = pd.DataFrame({"step": 0, "run": HOSTILE, "method": HOSTILE, "setting": "normal", "accuracy": 0.5})
    return rep.build_report(
        df,
        summary,
        compare,
        metrics,
        [(h, h, b"\x89PNG fake") for h in HOSTILE],
        title=f"entropy-lens report: {HOSTILE[4]}",
        notes=HOSTILE,
        skipped=HOSTILE,
        max_tokens=50,
    )


def test_hostile_text_in_every_field_is_text_only():
    page = hostile_page()
    p = parse(page)
    # no markup from the data: one script (the page's own), images only the data-URI figures, no <b>,
    # no event handler; the raw forms never appear, their escaped forms do
    assert [t for t, _ in p.tags].count("script") == 1
    assert [a["alt"] for t, a in p.tags if t == "img"] == HOSTILE
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in p.tags if t == "img")
    assert "b" not in [t for t, _ in p.tags]
    assert not [(t, k) for t, a in p.tags for k in a if k.lower().startswith("on")]
    assert "<script>alert(7)" not in page and "&lt;script&gt;alert(7)&lt;/script&gt;" in page
    assert '"><img src=x' not in page and "&#34;&gt;&lt;img src=x onerror=alert(8)&gt;" in page
    assert "</span></div><b>" not in page
    # every field shows the text as typed: template syntax in the data is never evaluated
    text = page_text(page)
    for tag in ("title", "h1", "li", "td", "caption", "figcaption", "option", "span", "body"):
        assert tag in text
    assert text["title"] == text["h1"] == f"entropy-lens report: {HOSTILE[4]}"
    for h in HOSTILE:
        assert h in text["li"] and h in text["td"] and h in text["figcaption"]
    assert HOSTILE[3] in text["caption"]  # compare lr in the caption
    assert set(p.spans) == set(HOSTILE)
    assert [a["id"] for t, a in p.tags if t == "figure"] == [f"fig-{h}" for h in HOSTILE]


def test_template_environment_autoescapes_and_is_strict():
    import jinja2

    env = rep.environment()
    page = env.get_template("page.html.j2")
    assert env.autoescape is True and page.new_context({}).eval_ctx.autoescape is True
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        page.render({})
    assert str(env.from_string("{{ x }}").render(x="<i>")) == "&lt;i&gt;"
    # the templates mark nothing safe and never turn escaping off
    names = [n for n in env.list_templates() if n.endswith(".j2")]
    assert {"page.html.j2", "script.js.j2"} <= set(names)
    for name in names:
        src = env.loader.get_source(env, name)[0]
        assert not re.search(r"\|\s*safe\b", src) and not re.search(r"{%-?\s*autoescape", src), name
    # nor does the Python side: no hand-written escaping, no Markup
    for path in Path(rep.__file__).parent.glob("*.py"):
        src = path.read_text(encoding="utf-8")
        assert "Markup" not in src and "html.escape" not in src, path.name


def test_csp_meta_tag_allows_only_the_page_script():
    df, summary = make_tokens()
    page = rep.build_report(df, summary)
    metas = [a for t, a in parse(page).tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(metas) == 1
    assert metas[0]["content"] == (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; " f"script-src 'sha256-{rep.script_sha256()}'"
    )
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    assert base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() == rep.script_sha256()
    assert page.index("Content-Security-Policy") < page.index("<style>") < page.index("<body")
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")


def test_control_characters_become_replacement_chars():
    df, summary = make_tokens(texts=["a\x01b", "\x00", "ok\t", "\x7f"])
    page = rep.build_report(df, summary, title="run\x07", notes=["n\x1b"])
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", page)
    assert set(parse(page).spans) == {"a\ufffdb", "\ufffd", "ok\t"}
    assert "run\ufffd" in page and "n\ufffd" in page


def test_data_functions_return_plain_values():
    from entropy_lens.report import colours, data

    got = [data.fmt(x) for x in (None, True, np.int64(3), 0.1234567, float("nan"), "<x>")]
    assert got == ["–", "True", "3", "0.123", "nan", "<x>"]
    t = data.table(("a", "b"), [(1, "<x>"), (True, 2.5)], "cap")
    assert [[(c.text, c.kind) for c in r] for r in t.rows] == [[("1", "num"), ("<x>", "txt")], [("True", "txt"), ("2.5", "num")]]
    (f,) = data.figure_views([("n", "c", b"\x89PNG\x00\xff")])
    assert re.fullmatch(r"[A-Za-z0-9+/=]+", f.png_base64) and base64.b64decode(f.png_base64) == b"\x89PNG\x00\xff"
    df, summary = make_tokens()
    modes = rep.colour_modes(df, LR, summary["n_tokens"])
    div, seq = colours.legend(modes[0]), colours.legend(modes[-1])
    assert len(div.ticks) == 3 and div.ticks[1] == "0" and div.gradient.count("#") == 3
    assert seq.ticks[0] == "0 nats" and seq.gradient.count("#") == 2 and seq.label == "token entropy H"


BIDI = ["\u202e", "\u202a", "\u202b", "\u202c", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f", "\u061c"]


def test_bidi_controls_are_shown_not_obeyed():
    """An RTL override in model text would visually reverse what follows it on the page; every
    bidirectional control character is replaced by a visible ⟨U+XXXX⟩ in every printed field."""
    texts = ["abc\u202edef", "\u2067x\u2069", "\u200eok", "plain"]
    df, summary = make_tokens(texts=texts)
    summary["notes"] = ["note \u202egnp.exe"]
    page = rep.build_report(df, summary, title="run \u202b1", notes=["top \u2066x"])
    assert not [c for c in BIDI if c in page]
    assert set(parse(page).spans) == {"abc⟨U+202E⟩def", "⟨U+2067⟩x⟨U+2069⟩", "⟨U+200E⟩ok", "plain"}
    assert "note ⟨U+202E⟩gnp.exe" in page and "run ⟨U+202B⟩1" in page and "top ⟨U+2066⟩x" in page
    from entropy_lens.report.page import printable

    assert printable("".join(BIDI)) == "".join(f"⟨U+{ord(c):04X}⟩" for c in BIDI)
    assert printable("a\x01\u202eb") == "a\ufffd⟨U+202E⟩b" and printable(3) == 3
    assert printable("עברית and العربية") == "עברית and العربية"  # RTL letters themselves are text, kept
