"""Nothing of the user's is overwritten: every path a job writes (output, summary, checkpoint
folder, cache) is checked as a set against the job file, the input and each other, through
``~`` and symbolic links, before anything is sent. Through the real CLI against the emulator."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_batch.cli import main

from .conftest import write_csv
from .refusal import refused, spec

def write_spec(folder: Path, name: str = "job.yaml", **sections: Any) -> Path:
    sections.setdefault("input", {"path": "input.csv", "id_column": "id"})
    path = folder / name
    path.write_text(yaml.safe_dump(spec("paths", **sections), sort_keys=False), encoding="utf-8")
    return path


def prepare(folder: Path) -> None:
    write_csv(folder / "input.csv", ["id", "text"], [["a", "one"], ["b", "two"]])
    out = folder / "out"
    out.mkdir()
    # An earlier run's results: a refused run must leave them as they are.
    (out / "result.parquet").write_bytes(b"earlier output")
    (out / "result.parquet.summary.json").write_text("{}", encoding="utf-8")


# Each case prepares the folder and returns (argv after the command, fragments of the message).
Case = Callable[[Path], tuple[list[str], list[str]]]


def output_is_the_job_file(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "job.yaml"})
    return [str(job)], ["output.path is the job file", "choose another output path"]


def output_flag_links_to_the_job_file(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "out/result.parquet"})
    (folder / "link.parquet").symlink_to("job.yaml")
    return [str(job), "--output", str(folder / "link.parquet")], ["--output", "link.parquet", "is the job file"]


def output_links_to_the_input(folder: Path) -> tuple[list[str], list[str]]:
    (folder / "res.parquet").symlink_to("input.csv")
    job = write_spec(folder, output={"path": "res.parquet"})
    return [str(job)], ["output.path is the input file", str(folder / "input.csv")]


def output_through_a_linked_folder_is_the_input(folder: Path) -> tuple[list[str], list[str]]:
    (folder / "alias").symlink_to(".")
    job = write_spec(folder, output={"path": "alias/input.csv"})
    return [str(job)], ["output.path is the input file"]


def output_is_a_hard_link_of_the_input(folder: Path) -> tuple[list[str], list[str]]:
    os.link(folder / "input.csv", folder / "hard.parquet")
    job = write_spec(folder, output={"path": "hard.parquet"})
    return [str(job)], ["output.path is the input file"]


def summary_is_the_job_file(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, name="r.parquet.summary.json", output={"path": "r.parquet"})
    return [str(job)], ["summary file r.parquet.summary.json", "is the job file"]


def manifest_is_the_job_file(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, name="r.parquet.manifest.json", output={"path": "r.parquet"})
    return [str(job)], ["run manifest r.parquet.manifest.json", "is the job file"]


def checkpoint_folder_holds_the_input(folder: Path) -> tuple[list[str], list[str]]:
    (folder / "r.parquet.checkpoint").mkdir()
    write_csv(folder / "r.parquet.checkpoint" / "rows.csv", ["id", "text"], [["a", "one"]])
    job = write_spec(folder, input={"path": "r.parquet.checkpoint/rows.csv", "id_column": "id"}, output={"path": "r.parquet"})
    return [str(job)], ["checkpoint folder r.parquet.checkpoint", "would hold the input file"]


def checkpoint_name_is_a_file(folder: Path) -> tuple[list[str], list[str]]:
    (folder / "r.parquet.checkpoint").write_text("my notes", encoding="utf-8")
    job = write_spec(folder, output={"path": "r.parquet"})
    return [str(job)], ["checkpoint folder r.parquet.checkpoint", "is not a folder"]


def cache_is_the_input(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "out/result.parquet"}, cache={"path": "input.csv"})
    return [str(job)], ["cache.path is the input file"]


def cache_is_the_output(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "out/result.parquet"}, cache={"path": "out/result.parquet"})
    return [str(job)], ["output.path and cache.path are the same file"]


def output_is_an_existing_folder(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "out"})
    return [str(job)], ["output.path is an existing folder", "end the path with /"]


def output_flag_is_an_existing_folder(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, output={"path": "out/result.parquet"})
    return [str(job), "--output", str(folder / "out")], ["--output", "is an existing folder"]


def output_is_a_symlink_loop(folder: Path) -> tuple[list[str], list[str]]:
    (folder / "l1").symlink_to("l2")
    (folder / "l2").symlink_to("l1")
    job = write_spec(folder, output={"path": "l1"})
    return [str(job)], ["l1", "symbolic link loop"]


def input_ends_in_a_slash(folder: Path) -> tuple[list[str], list[str]]:
    job = write_spec(folder, input={"path": "input.csv/", "id_column": "id"})
    return [str(job)], ["input.path", "names a folder"]


CASES: dict[str, Case] = {case.__name__: case for case in [
    output_is_the_job_file, output_flag_links_to_the_job_file, output_links_to_the_input,
    output_through_a_linked_folder_is_the_input, output_is_a_hard_link_of_the_input, summary_is_the_job_file,
    manifest_is_the_job_file,
    checkpoint_folder_holds_the_input, checkpoint_name_is_a_file, cache_is_the_input, cache_is_the_output,
    output_is_an_existing_folder, output_flag_is_an_existing_folder, output_is_a_symlink_loop, input_ends_in_a_slash,
]}
COMMANDS = {"run": ["run", "--quiet"], "validate": ["validate"], "estimate": ["estimate"], "status": ["status"]}


_PAIRS = [
    pytest.param(case, command, id=f"{command}-{case}")
    for case in CASES
    for command in COMMANDS
    if not (command == "validate" and "_flag_" in case)  # validate has no --output
]


@pytest.mark.parametrize(("case", "command"), _PAIRS)
def test_a_path_that_would_overwrite_the_users_files_is_refused_before_sending(
    tmp_path: Path, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    prepare(tmp_path)
    args, fragments = CASES[case](tmp_path)
    line = refused([*COMMANDS[command][:1], *args, *COMMANDS[command][1:]], tmp_path, emulator, capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_tilde_is_the_home_folder_in_the_spec_and_on_the_command_line(
    tmp_path: Path, job_env: dict, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    write_csv(home / "input.csv", ["id", "text"], [["a", "one"]])
    job = write_spec(work, input={"path": "~/input.csv", "id_column": "id"}, output={"path": "~/r.parquet"})
    assert main(["run", str(job), "--quiet"]) == 0
    assert (home / "r.parquet").is_file()
    assert main(["run", str(job), "--quiet", "--output", "~/flag.parquet"]) == 0
    assert (home / "flag.parquet").is_file()
    assert not any(path.name == "~" for path in tmp_path.rglob("*"))


def test_an_output_path_ending_in_a_slash_is_a_folder_that_gets_the_jobs_name(
    tmp_path: Path, job_env: dict, emulator: Any
) -> None:
    write_csv(tmp_path / "input.csv", ["id", "text"], [["a", "one"]])
    job = write_spec(tmp_path, output={"path": "results/"})
    assert main(["run", str(job), "--quiet"]) == 0
    assert (tmp_path / "results" / "paths.parquet").is_file()
    assert (tmp_path / "results" / "paths.parquet.summary.json").is_file()
    assert main(["run", str(job), "--quiet", "--output", f"{tmp_path}/flag/"]) == 0
    assert (tmp_path / "flag" / "paths.parquet").is_file()
    assert not (tmp_path / "results").is_file() and not (tmp_path / "flag").is_file()


# -- property: whatever way a written path is made to alias a file of the user's, it is refused --

_ROLES = ["output.path", "--output", "cache.path", "summary", "checkpoint"]
_SPELLINGS = ["plain", "symlink", "dotdot", "tilde", "linked-folder", "absolute"]


def _spelled(folder: Path, target: str, spelling: str) -> str:
    """A path that resolves to ``folder/target``, written one of several ways."""
    if spelling == "symlink":
        (folder / "link").symlink_to(target)
        return "link"
    if spelling == "dotdot":
        (folder / "sub").mkdir(exist_ok=True)
        return f"sub/../{target}"
    if spelling == "tilde":
        return f"~/{target}"  # HOME is the folder in this test
    if spelling == "linked-folder":
        (folder / "here").symlink_to(".")
        return f"here/{target}"
    if spelling == "absolute":
        return str(folder / target)
    return target


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    role=st.sampled_from(_ROLES), victim=st.sampled_from(["job", "input"]), spelling=st.sampled_from(_SPELLINGS),
    command=st.sampled_from(["run", "validate"]),
)
def test_any_spelling_of_an_aliasing_path_is_refused_and_nothing_changes(
    tmp_path_factory: pytest.TempPathFactory, job_env: dict, emulator: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, role: str, victim: str, spelling: str, command: str,
) -> None:
    if command == "validate" and role == "--output":
        return  # validate has no --output
    folder = tmp_path_factory.mktemp("alias")
    monkeypatch.setenv("HOME", str(folder))
    # Where the job file and the input live: for the summary and checkpoint roles the victim
    # sits where the output's summary file goes, or inside its checkpoint folder.
    names = {"job": "job.yaml", "input": "input.csv"}
    if role == "summary":
        names[victim] = "r.parquet.summary.json"
    elif role == "checkpoint":
        (folder / "r.parquet.checkpoint").mkdir()
        names[victim] = f"r.parquet.checkpoint/{names[victim]}"
    write_csv(folder / names["input"], ["id", "text"], [["a", "one"], ["b", "two"]])
    sections: dict[str, Any] = {"input": {"path": names["input"], "id_column": "id"}, "output": {"path": "out/r.parquet"}}
    argv_extra: list[str] = []
    if role in ("summary", "checkpoint"):
        sections["output"] = {"path": _spelled(folder, "r.parquet", spelling)}
    elif role == "output.path":
        sections["output"] = {"path": _spelled(folder, names[victim], spelling)}
    elif role == "--output":
        argv_extra = ["--output", _spelled(folder, names[victim], spelling)]
    else:
        sections["cache"] = {"path": _spelled(folder, names[victim], spelling)}
    job = write_spec(folder, name=names["job"], **sections)
    monkeypatch.chdir(folder)  # --output is taken from the working folder, as a shell user types it
    argv = [command, str(job), *argv_extra] + (["--quiet"] if command == "run" else [])
    refused(argv, folder, emulator, capsys)
