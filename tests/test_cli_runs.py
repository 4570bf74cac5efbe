"""What `dynarank` writes and reads back: paths a run records, export targets, reports, eval of adapters."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import dynarank.cli.commands as commands_module
from dynarank.cli import main
from dynarank.training import models
from dynarank.training.models import load_classifier, resolve_model_dir
from test_cli import kill_after, train_args, write_csv
from test_cli_inputs import refused


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One finished ARD run and one stock LoRA run, with their training CSV ('data')."""
    root = tmp_path_factory.mktemp("runs")
    data = write_csv(root / "data.csv")
    made = {"data": data}
    for method in ("ard", "lora"):
        assert main(train_args(tiny_model_dir, data, root / method, "--method", method)) == 0
        made[method] = root / method
    return made


# ---------------------------------------------------------------------------- recorded paths
@pytest.mark.parametrize("method", ["ard", "lora"])
def test_a_run_records_absolute_paths_and_is_usable_from_another_directory(
    tiny_model_dir, tmp_path, monkeypatch, capsys, method
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    write_csv(work / "data.csv")
    write_csv(work / "held.csv", n=10)
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_model_dir, work)
    argv = train_args(model, "data.csv", "run", "--method", method, "--eval-data", "held.csv")
    assert main(argv) == 0
    run = work / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == str(tiny_model_dir.resolve())
    assert config["data"] == str(work / "data.csv") and config["eval_data"] == str(work / "held.csv")
    assert json.loads((run / "summary.json").read_text())["model"] == str(tiny_model_dir.resolve())
    assert json.loads((run / "adapter" / "dynarank_run.json").read_text())["model"] == str(tiny_model_dir.resolve())
    peft_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(work / "held.csv")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert main(["export", str(run), "--out", "exported"]) == 0
    capsys.readouterr()
    assert main(["eval", "exported", "--data", str(work / "held.csv")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics


def test_the_packaged_model_aliases_win_over_a_folder_of_the_same_name(tmp_path, monkeypatch):
    packaged = tmp_path / "cache" / "SmolLM2-135M"
    monkeypatch.setattr(models, "packaged_smollm2_path", lambda: packaged)
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("smollm2") == packaged
    assert resolve_model_dir(None) == models.packaged_minilm_path().resolve()
    assert resolve_model_dir("./smollm2") == tmp_path / "smollm2"


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("method", ["ard", "lora"])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("held", [["adapter_config.json"], ["adapter_config.json", "notes.txt"]])
def test_export_refuses_an_existing_out_and_leaves_it_untouched(runs, tmp_path, capsys, method, merged, held):
    taken = tmp_path / "taken"
    taken.mkdir()
    for name in held:  # an adapter the user already has, and maybe files of their own beside it
        (taken / name).write_text("{}")
    err = refused(["export", str(runs[method]), "--out", str(taken), *(["--merged"] if merged else [])], capsys)
    assert "taken" in err and "exists" in err
    assert sorted(p.name for p in taken.iterdir()) == held
    assert all((taken / name).read_text() == "{}" for name in held)


def test_export_into_an_existing_empty_directory_is_refused_as_the_readme_says(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = refused(["export", str(runs["lora"]), "--out", str(tmp_path / "empty")], capsys)
    assert "empty already exists" in err
    assert list((tmp_path / "empty").iterdir()) == []


def _full_disk(path, *args, **kwargs):
    raise OSError(28, "No space left on device", str(path))


@pytest.mark.parametrize("merged", [False, True])
def test_a_failed_export_leaves_nothing_behind(runs, tmp_path, monkeypatch, capsys, merged):
    if merged:  # the merged model is written, then its tokenizer fails
        real = commands_module.load_trained

        def tokenizer_fails(*args, **kwargs):
            model, tokenizer, summary = real(*args, **kwargs)
            tokenizer.save_pretrained = _full_disk
            return model, tokenizer, summary

        monkeypatch.setattr(commands_module, "load_trained", tokenizer_fails)
    else:  # the adapter is copied, then dynarank_run.json fails
        monkeypatch.setattr(commands_module, "write_adapter_info", _full_disk)
    out = tmp_path / "exports" / "adapter"
    err = refused(["export", str(runs["lora"]), "--out", str(out), *(["--merged"] if merged else [])], capsys)
    assert "No space left on device" in err
    assert not (tmp_path / "exports").exists()  # nor a staging directory, nor the folder made to hold --out


def test_export_server_safe_and_merged_together_are_refused(runs, tmp_path, capsys):
    err = refused(["export", str(runs["ard"]), "--out", str(tmp_path / "x"), "--server-safe", "--merged"], capsys)
    assert "--server-safe" in err and "--merged" in err
    assert not (tmp_path / "x").exists()


def test_a_classifier_run_is_not_exported_server_safe_without_its_task_head(runs, tmp_path, capsys):
    """A server-safe adapter holds LoRA matrices only: a classifier exported so would answer with a fresh head."""
    err = refused(["export", str(runs["ard"]), "--out", str(tmp_path / "x"), "--server-safe"], capsys)
    assert "classifier" in err and "task head" in err and "without --server-safe" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(runs["ard"]), "--out", str(tmp_path / "x")]) == 0  # the plain export keeps the head


def test_export_under_a_file_is_one_line_and_exit_code_2(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(["export", str(runs["lora"]), "--out", str(tmp_path / "file" / "adapter")], capsys)
    assert f"{tmp_path / 'file'} is a file, not a directory" in err


# ---------------------------------------------------------------------------- report
def test_a_baseline_run_gets_training_curves_and_report_redraws_them(runs, capsys):
    run = runs["lora"]
    assert (run / "training_curves.png").stat().st_size > 1000  # drawn by train
    (run / "training_curves.png").unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "training_curves.png")]
    assert (run / "training_curves.png").stat().st_size > 1000
    assert not (run / "ranks_heatmap.png").exists()  # no ranks to draw


def test_a_dynarank_run_gets_rank_pictures_and_training_curves(runs, capsys):
    capsys.readouterr()
    assert main(["report", str(runs["ard"])]) == 0
    drawn = {Path(p).name for p in capsys.readouterr().out.split()}
    assert drawn == {"ranks_heatmap.png", "ranks_over_time.png", "training_curves.png"}


def _drawn_figures(run: Path, monkeypatch) -> dict[str, object]:
    """Figures that ``dynarank report`` saves, by file name, drawn again on a fresh canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures, real = {}, Figure.savefig

    def keep(fig, fname, *args, **kwargs):
        figures[Path(fname).name] = fig
        return real(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    assert main(["report", str(run)]) == 0
    for fig in figures.values():
        FigureCanvasAgg(fig).draw()
    return figures


def test_the_heatmap_shows_whole_layer_and_head_numbers(runs, monkeypatch):
    fig = _drawn_figures(runs["ard"], monkeypatch)["ranks_heatmap.png"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6  # query, key, value, attention output, intermediate, output
    for ax in panels:
        assert list(ax.get_yticks()) == [0, 1]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]  # the two layers
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_the_heatmap_panels_and_labels_do_not_overlap(runs, monkeypatch):
    fig = _drawn_figures(runs["ard"], monkeypatch)["ranks_heatmap.png"]
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    for i, a in enumerate(boxes):
        assert fig.bbox.contains(a.x0 + 1, a.y0 + 1) and fig.bbox.contains(a.x1 - 1, a.y1 - 1)  # inside the image
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


def test_trainable_parameters_are_drawn_once_in_the_training_curves(runs, monkeypatch):
    figures = _drawn_figures(runs["ard"], monkeypatch)
    drawn = [name for name, fig in figures.items() for ax in fig.axes if ax.get_ylabel() == "trainable parameters"]
    assert drawn == ["training_curves.png"]
    assert [ax.get_ylabel() for ax in figures["ranks_over_time.png"].axes] == ["total rank of the layer"]


def test_a_picture_that_fails_to_draw_leaves_no_figure_open(runs, monkeypatch):
    import matplotlib.pyplot as plt

    from dynarank.cli import report

    def fails_half_way(plt, snapshot):
        plt.subplots()
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "_heatmap", fails_half_way)  # drawn after the training curves
    open_before = plt.get_fignums()
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.draw(runs["ard"])
    assert plt.get_fignums() == open_before


# ---------------------------------------------------------------------------- eval
@pytest.fixture
def stock_adapter(tiny_model_dir, tmp_path) -> Path:
    """A classification LoRA adapter written by plain PEFT (no dynarank_run.json beside it)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_classifier(tiny_model_dir, ["negative", "positive"])
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    get_peft_model(model, config).save_pretrained(tmp_path / "stock")
    return tmp_path / "stock"


def test_eval_of_a_foreign_classification_adapter_takes_labels(stock_adapter, runs, capsys):
    err = refused(["eval", str(stock_adapter), "--data", str(runs["data"])], capsys)
    assert "--labels" in err
    assert main(["eval", str(stock_adapter), "--data", str(runs["data"]), "--labels", "negative,positive"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "macro_f1"}


def test_eval_refuses_labels_that_do_not_fit_the_adapter(stock_adapter, runs, capsys):
    argv = ["eval", str(stock_adapter), "--data", str(runs["data"])]
    err = refused([*argv, "--labels", "negative,neutral,positive"], capsys)
    assert "task head has 2 outputs, but 3 labels are named (negative,neutral,positive)" in err
    err = refused([*argv, "--labels", "negative,neutral"], capsys)
    assert "positive" in err  # the data has a label outside --labels


def test_eval_refuses_labels_that_contradict_the_run(runs, capsys):
    err = refused(["eval", str(runs["lora"]), "--data", str(runs["data"]), "--labels", "positive,negative"], capsys)
    assert "negative" in err and "--labels" in err


@pytest.mark.parametrize("target", ["lora", "exported"])
def test_eval_refuses_a_causal_lms_columns_on_a_classifier(runs, tmp_path, capsys, target):
    path = runs["lora"]
    if target == "exported":
        assert main(["export", str(path), "--out", str(tmp_path / "exported")]) == 0
        path = tmp_path / "exported"
    err = refused(["eval", str(path), "--data", str(runs["data"]), "--prompt-column", "text"], capsys)
    assert "--prompt-column would not be used" in err and "classify run" in err


def test_eval_of_a_run_truncates_at_the_runs_max_length(runs, monkeypatch):
    lengths = []
    real = commands_module.evaluate_classifier

    def spy(model, tokenizer, examples, max_length=64, **kwargs):
        lengths.append(max_length)
        return real(model, tokenizer, examples, max_length, **kwargs)

    monkeypatch.setattr(commands_module, "evaluate_classifier", spy)
    assert main(["eval", str(runs["lora"]), "--data", str(runs["data"])]) == 0
    assert main(["eval", str(runs["lora"] / "adapter"), "--data", str(runs["data"])]) == 0
    assert main(["eval", str(runs["lora"]), "--data", str(runs["data"]), "--max-length", "9"]) == 0
    assert lengths == [16, 16, 9]  # train_args trains with --max-length 16


def _base_of_another_size(tiny_model_dir: Path, path: Path) -> Path:
    """The tiny BERT's shape with hidden size 64 instead of 32, and the same tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 64, 128
    BertForSequenceClassification(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, path / name)
    return path


def test_eval_of_an_adapter_on_another_base_names_the_weight_and_both_shapes(
    stock_adapter, tiny_model_dir, runs, tmp_path, capsys
):
    other = _base_of_another_size(tiny_model_dir, tmp_path / "other-base")
    argv = ["eval", str(stock_adapter), "--model", str(other), "--data", str(runs["data"])]
    err = refused([*argv, "--labels", "negative,positive"], capsys)
    assert "was trained on a different base model" in err and "pass the --model it was trained on" in err
    assert "bert.encoder.layer.0.attention.self.query.lora_A.default.weight is [2, 32], but [2, 64]" in err
    assert "outputs" not in err


def _pickled(folder: Path, safetensors_name: str, pickle_name: str) -> None:
    """Replace ``folder``'s safetensors weights by the same tensors saved with torch.save (a pickle)."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / safetensors_name), folder / pickle_name)
    (folder / safetensors_name).unlink()


def test_eval_refuses_an_adapter_saved_as_a_pickle_without_loading_it(stock_adapter, runs, capsys, unpickled):
    _pickled(stock_adapter, "adapter_model.safetensors", "adapter_model.bin")
    argv = ["eval", str(stock_adapter), "--data", str(runs["data"]), "--labels", "negative,positive"]
    err = refused(argv, capsys)
    assert "adapter_model.bin, a pickle, which dynarank never loads" in err and "convert it to safetensors" in err
    assert unpickled == []


def test_a_run_on_a_gguf_folder_records_the_folder_and_works_after_the_cache_is_cleared(
    tiny_model_dir, runs, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DYNARANK_CACHE", str(cache))
    conversions = []

    def convert(source, gguf_file, target):  # stands in for the dequantisation: the tiny model is the copy
        conversions.append(gguf_file)
        shutil.copytree(tiny_model_dir, target)
        return target

    monkeypatch.setattr(models, "converted_gguf", convert)
    folder = tmp_path / "my-gguf-model"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF")
    run = tmp_path / "run"
    assert main(train_args(folder, runs["data"], run, "--method", "lora")) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == str(folder.resolve())
    assert json.loads((run / "summary.json").read_text())["model"] == str(folder.resolve())
    assert json.loads((run / "adapter" / "dynarank_run.json").read_text())["model"] == str(folder.resolve())

    shutil.rmtree(cache)  # the cache is cleared (or the run was copied to another machine)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(runs["data"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    shutil.rmtree(cache)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "exported"), "--data", str(runs["data"])]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    # train; eval after the cache was cleared; export reuses eval's copy; eval of the export after a new clear
    assert conversions == ["tiny.gguf"] * 3


# ---------------------------------------------------------------------------- reproducibility
def _run_files(run: Path) -> dict[str, bytes]:
    """What must be identical between two runs of the same command: logs and adapter tensors."""
    names = ["metrics.jsonl", "ranks.jsonl", "adapter/adapter_model.safetensors"]
    names += ["dynarank_adapter/dynarank_adapter.safetensors"] if (run / "dynarank_adapter").is_dir() else []
    return {name: (run / name).read_bytes() for name in names if (run / name).is_file()}


@pytest.mark.parametrize("method", ["ard", "elalora", "lora"])
def test_two_runs_of_the_same_command_are_bitwise_equal_even_with_a_new_task_head(tiny_model_dir, tmp_path, method):
    """Five labels: the saved two-label head does not fit, so loading draws a new head; it must follow --seed."""
    data = write_csv(tmp_path / "five.csv", n=60, labels=("a", "b", "c", "d", "e"))
    argv = ["--method", method, "--seed", "3", "--max-steps", "8"]
    assert main(train_args(tiny_model_dir, data, tmp_path / "one", *argv)) == 0
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    torch.rand(7)
    assert main(train_args(tiny_model_dir, data, tmp_path / "two", *argv)) == 0
    one, two = _run_files(tmp_path / "one"), _run_files(tmp_path / "two")
    assert "metrics.jsonl" in one and "adapter/adapter_model.safetensors" in one
    assert one == two
    assert main(train_args(tiny_model_dir, data, tmp_path / "other-seed", "--method", method, "--max-steps", "8")) == 0
    assert _run_files(tmp_path / "other-seed")["metrics.jsonl"] != one["metrics.jsonl"]


def test_a_killed_five_label_run_resumed_equals_a_separately_launched_uninterrupted_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    data = write_csv(tmp_path / "five.csv", n=60, labels=("a", "b", "c", "d", "e"))
    argv = ["--method", "ard", "--max-steps", "12", "--save-every", "4"]
    kill_after(monkeypatch, 9)  # the process dies after step 9 (checkpoint at 8)
    assert main(train_args(tiny_model_dir, data, tmp_path / "killed", *argv)) == 130
    monkeypatch.undo()
    torch.manual_seed(999)  # a separately launched process starts from another RNG state
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    torch.manual_seed(4321)
    assert main(train_args(tiny_model_dir, data, tmp_path / "full", *argv)) == 0
    assert _run_files(tmp_path / "killed") == _run_files(tmp_path / "full")
