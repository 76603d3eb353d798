"""An HTML template for `dvc plots show` that draws with no network.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a public CDN, so offline it is blank.
`.dvc/config` points `plots.html_template` at the page written here: the three libraries inlined from
`vl-convert-python` (which bundles them), and no `{scripts}` placeholder, so DVC's CDN tags are never
inserted. The `plots_template` stage of dvc.yaml writes it; `python -m tasks.runners.dvc_plots PATH`
does the same by hand.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Sequence
from pathlib import Path

from tasks.core.artifacts import write_text_atomic

# DVC's plot templates are Vega-Lite v5 specs: bundle the newest v5 compiler that vl-convert ships.
_VEGA_LITE_MAJOR = "5."
# Charts as SVG (inspectable, and the offline test counts their marks); no export menu, which would
# offer to open the chart in the online Vega editor.
_EMBED_DEFAULTS = """\
(function () {
  const embed = window.vegaEmbed;
  window.vegaEmbed = (el, spec, opts) => embed(el, spec, Object.assign({renderer: "svg", actions: false}, opts || {}));
})();"""
_EXPOSE = "window.vegaEmbed = vegaEmbed; window.vegaLite = vegaLite; window.vega = vega;"

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>qa-lora: DVC plots</title>
    <!-- {versions}, inlined from vl-convert-python: no network needed -->
    <script>{bundle}</script>
    <script>{embed_defaults}</script>
    <style>
        table {{ border-spacing: 15px; }}
        body {{ font-family: sans-serif; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def offline_template() -> str:
    """The page DVC fills with its plots: `{plot_divs}` and `{refresh_tag}` placeholders, libraries inline.

    Returns:
        The HTML text of the template.
    """
    import vl_convert as vlc

    v5 = [v for v in vlc.get_vegalite_versions() if v.startswith(_VEGA_LITE_MAJOR)]
    vl_version = max(v5, key=lambda v: tuple(int(p) for p in v.split("."))) if v5 else None
    bundle = vlc.javascript_bundle(_EXPOSE, vl_version=vl_version)
    # An inline script ends at the first "</script" in its text, wherever it is; and the bundle's top-level
    # `const`s would clash with DVC's per-chart `var spec` in the same global scope: wrap it in a function.
    bundle = "(function () {\n" + bundle.replace("</script", "<\\/script") + "\n})();"
    versions = (
        f"vega {vlc.get_vega_version()}, vega-lite {vl_version or 'latest'}, "
        f"vega-embed {vlc.get_vega_embed_version()}"
    )
    page = _PAGE.format(
        refresh_tag="{refresh_tag}",
        versions=html.escape(versions),
        bundle="{bundle}",
        embed_defaults=_EMBED_DEFAULTS,
    )
    # The bundle is inserted last: str.format would read its braces as fields.
    return page.replace("{bundle}", bundle, 1)


def write_offline_template(path: Path | str) -> Path:
    """Write :func:`offline_template` to `path` (atomically).

    Args:
        path: where `.dvc/config`'s `plots.html_template` points (relative to `.dvc/`).

    Returns:
        The path written.
    """
    return write_text_atomic(Path(path), offline_template())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tasks.runners.dvc_plots PATH`: write the offline plots template."""
    parser = argparse.ArgumentParser(prog="python -m tasks.runners.dvc_plots", description=__doc__)
    parser.add_argument("path", help="output HTML file")
    args = parser.parse_args(argv)
    print(write_offline_template(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
