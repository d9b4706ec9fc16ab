"""`benchmarks/eval_demo.py`: its figures from per-clip records, its ablation switch, its argument checks."""

import importlib.util
from pathlib import Path

import pytest
from fixtures_pipeline import build_tiny_components

from diffusers_skyreels import SkyReelsV4Pipeline

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_demo.py"
_SPEC = importlib.util.spec_from_file_location("eval_demo", _PATH)
eval_demo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(eval_demo)


def _record(index, colour, shape, got_colour, got_shape, moving, bounces, onsets, pitches):
    return {"index": index, "prompt": "", "true_colour": colour, "true_shape": shape, "colour": got_colour,
            "shape": got_shape, "moving": moving, "video_bounces": bounces, "onsets": onsets, "pitches": pitches}


def test_summarise_counts_every_figure_from_the_records():
    records = [
        _record(0, "red", "ball", "red", "ball", True, [0.5, 1.5], [0.52, 1.0], ["red", "red"]),
        _record(1, "blue", "square", "blue", "ball", True, [1.0], [1.04], ["green"]),
        _record(2, "green", "ball", None, None, False, [], [], []),
        _record(3, "yellow", "square", "red", "square", True, [0.25], [1.5], ["yellow"]),
    ]
    got = eval_demo.summarise(records, seconds=[3.0, 1.0, 2.0, 10.0])
    # Within 1/16 s: clip 0 matches 0.5~0.52 (1.5 and 1.0 unmatched), clip 1 matches 1.0~1.04, clip 3 none.
    assert got["sync_video_to_audio"] == pytest.approx(2 / 4)
    assert got["sync_audio_to_video"] == pytest.approx(2 / 4)
    # Each clip's bounces against the next clip's onsets: clip 0's [0.5, 1.5] vs [1.04], clip 1's [1.0] vs [],
    # clip 3's [0.25] vs clip 0's [0.52, 1.0]: nothing within 1/16 s, and clip 3's onset 1.5 meets clip 2's
    # (absent) bounces.
    assert got["sync_video_to_audio_mismatched"] == 0.0
    assert got["sync_audio_to_video_mismatched"] == 0.0
    assert got["colour_accuracy"] == pytest.approx(2 / 4)
    assert got["shape_accuracy"] == pytest.approx(2 / 4)  # clips 0 and 3
    assert got["moving"] == pytest.approx(3 / 4)
    assert got["pitch_accuracy"] == pytest.approx(3 / 4)  # red, red, (green for blue), yellow
    assert (got["video_bounces"], got["ping_onsets"], got["clips"]) == (4, 4, 4)
    assert got["seconds_per_clip_median"] == pytest.approx(2.5)


def test_summarise_mismatched_sync_reads_the_next_clips_audio():
    records = [
        _record(0, "red", "ball", "red", "ball", True, [1.0], [0.3], ["red"]),
        _record(1, "red", "ball", "red", "ball", True, [0.3], [1.0], ["red"]),
    ]
    got = eval_demo.summarise(records, seconds=[1.0, 1.0])
    assert (got["sync_video_to_audio"], got["sync_audio_to_video"]) == (0.0, 0.0)
    assert (got["sync_video_to_audio_mismatched"], got["sync_audio_to_video_mismatched"]) == (1.0, 1.0)
    assert got["pitch_accuracy"] == 1.0 and got["shape_accuracy"] == 1.0


def test_summarise_without_events_reports_none():
    got = eval_demo.summarise([_record(0, "red", "ball", "red", "ball", False, [], [], [])], seconds=[1.0])
    assert got["sync_video_to_audio"] is None and got["sync_audio_to_video"] is None
    assert got["pitch_accuracy"] is None


def test_coupling_disabled_skips_and_restores_the_cross_modal_attention():
    pipe = SkyReelsV4Pipeline(**build_tiny_components())
    blocks = list(pipe.transformer.blocks) + list(pipe.audio_transformer.blocks)
    before = [block.attn_cross_modal for block in blocks]
    assert all(attention is not None for attention in before)
    with eval_demo.coupling_disabled(pipe):
        assert all(block.attn_cross_modal is None for block in blocks)
    assert all(block.attn_cross_modal is attention for block, attention in zip(blocks, before))
    with pytest.raises(RuntimeError), eval_demo.coupling_disabled(pipe):
        raise RuntimeError("restored on errors too")
    assert all(block.attn_cross_modal is attention for block, attention in zip(blocks, before))


@pytest.mark.parametrize(
    "argv,message",
    [(["--jobs", "0"], "--jobs must be at least 1"), (["--num-clips", "0"], "--num-clips must be at least 1")],
)
def test_bad_counts_are_rejected_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        eval_demo.main(argv)
    assert message in capsys.readouterr().err


def test_a_folder_without_a_pipeline_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_demo.main(["--model", str(tmp_path)])
    assert "is not a pipeline folder" in capsys.readouterr().err
