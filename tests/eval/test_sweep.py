"""`jip2p.eval.sweep`'s "grid" sweep and the one trade-off plot, drawn from CLIP metrics
(`jip2p-eval`) and from the world's exact scores (`jip2p-demo --sweep`)."""

import pytest

from jip2p.errors import ConfigError
from jip2p.eval import sweep


def test_grid_is_every_text_scale_times_every_image_scale():
  settings = sweep.settings("grid", text_values=(1, 3), image_values=(1, 1.5, 2))
  assert [(s.text_guidance, s.image_guidance) for s in settings] == [
      (t, i) for t in (1.0, 3.0) for i in (1.0, 1.5, 2.0)]
  assert {s.series for s in settings} == {"image"}
  with pytest.raises(ConfigError, match="distinct"):
    sweep.settings("grid", text_values=(1, 1))


def svg_of(table, tmp_path, **kwargs):
  path = str(tmp_path / "plot.svg")
  assert sweep.plot_tradeoff(table, [path], **kwargs)
  with open(path) as f:
    return f.read()


def test_a_line_per_fixed_scale_on_the_metrics_asked_for(tmp_path):
  # The demo's grid: a line per s_T (its legend entry), a point per s_I (its label).
  table = [{"group": "all", "series": s.series, "text_guidance": s.text_guidance,
            "image_guidance": s.image_guidance, "edit_ok": 0.9 - 0.1 * s.image_guidance,
            "input_psnr": 15 + s.image_guidance + s.text_guidance}
           for s in sweep.settings("grid", text_values=(1, 3), image_values=(1, 2))]
  svg = svg_of(table, tmp_path, x="input_psnr", y="edit_ok")
  for text in ("s_T = 1", "s_T = 3", "s_I=1", "s_I=2", "instruction followed (rate)",
               "closeness to the input image (PSNR dB)"):
    assert text in svg, text
  assert svg.count("s_T = 1<") == svg.count("s_T = 3<") == 1  # one legend entry per line
  assert "CLIP" not in svg
  # jip2p-eval's "both": the s_I series at s_T 7.5 and the s_T series at s_I 1.5.
  table = [{**e, "series": s.series, "text_guidance": s.text_guidance,
            "image_guidance": s.image_guidance, "clip_dir": 0.1, "clip_img": 0.8}
           for e, s in zip(table, sweep.settings("both", image_values=(1, 2),
                                                 text_values=(5, 9)))]
  svg = svg_of(table, tmp_path)
  for text in ("s_T = 7.5", "s_I = 1.5", "s_T=5", "s_T=9", "CLIP image similarity"):
    assert text in svg, text
