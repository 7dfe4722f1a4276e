"""The editor and bash tools as the model uses them: every answer is checked against the files
on the host, not only against the message."""

from __future__ import annotations

import os
from pathlib import Path

import batching_harness_sandbox as sb
import pytest

from tests.sandbox_helpers import (
    EDITOR,
    bash,
    edit,
    fake_home,
    make_policy,
    needs_sandbox,
    still_running_after,
    toolbox,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return fake_home(tmp_path, monkeypatch)


@pytest.fixture
def tools(tmp_path: Path, home: Path):
    with toolbox(make_policy(tmp_path)) as t:
        yield t


@pytest.fixture
def work(tools: sb.Toolbox) -> Path:
    return tools.bash.policy.workdir


# -- view ---------------------------------------------------------------------------------


def test_view_numbers_lines_like_cat_n(tools, work):
    (work / "a.py").write_text("first\n\tsecond\nthird")
    result = edit(tools, command="view", path="a.py")
    assert not result.is_error
    assert result.output.splitlines()[1:] == ["     1\tfirst", "     2\t\tsecond", "     3\tthird"]


def test_view_range_and_minus_one_for_the_end(tools, work):
    (work / "a.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    middle = edit(tools, command="view", path="a.txt", view_range=[3, 5]).output
    assert middle.splitlines()[1:] == ["     3\tline 3", "     4\tline 4", "     5\tline 5"]
    to_end = edit(tools, command="view", path="a.txt", view_range=[9, -1]).output
    assert to_end.splitlines()[1:] == ["     9\tline 9", "    10\tline 10"]
    bad = edit(tools, command="view", path="a.txt", view_range=[11, 12])
    assert bad.is_error and "10 lines" in bad.output
    assert edit(tools, command="view", path="a.txt", view_range=[5, 2]).is_error
    assert edit(tools, command="view", path="a.txt", view_range=[1]).is_error


def test_view_truncates_long_files_and_says_how_to_see_more(tools, work):
    (work / "big.txt").write_text("".join(f"{'x' * 99}\n" for _ in range(1000)))
    result = edit(tools, command="view", path="big.txt")
    assert len(result.output) < sb._EDITOR_MAX_CHARS + 500
    assert "truncated" in result.output and "of 1000" in result.output
    assert "view_range" in result.output


def test_view_directory_lists_two_levels_without_hidden_items(tools, work):
    (work / "src" / "pkg" / "deep").mkdir(parents=True)
    (work / "src" / "app.py").write_text("")
    (work / "src" / "pkg" / "mod.py").write_text("")
    (work / "src" / "pkg" / "deep" / "too_deep.py").write_text("")
    (work / "src" / ".hidden").write_text("")
    (work / ".env").write_text("")
    listing = edit(tools, command="view", path=".").output
    assert "./src/" in listing and "./src/app.py" in listing and "./src/pkg/" in listing
    assert "mod.py" not in listing  # third level
    assert ".hidden" not in listing and ".env" not in listing


# -- create / str_replace / insert ---------------------------------------------------------


def test_create_makes_parent_dirs_and_writes_exact_bytes(tools, work):
    text = "a\tb\r\nno final newline"
    result = edit(tools, command="create", path="new/dir/f.txt", file_text=text)
    assert not result.is_error
    assert (work / "new" / "dir" / "f.txt").read_bytes() == text.encode()
    again = edit(tools, command="create", path="new/dir/f.txt", file_text="second\n")
    assert "Overwrote" in again.output
    assert (work / "new" / "dir" / "f.txt").read_text() == "second\n"


def test_str_replace_changes_only_the_match_and_keeps_every_other_byte(tools, work):
    original = b"keep\ttabs\r\nold value\r\n\t\tindented\r\nno newline at end"
    (work / "f.txt").write_bytes(original)
    os.chmod(work / "f.txt", 0o755)
    result = edit(tools, command="str_replace", path="f.txt", old_str="old value", new_str="new")
    assert not result.is_error, result.output
    assert (work / "f.txt").read_bytes() == original.replace(b"old value", b"new")
    assert os.stat(work / "f.txt").st_mode & 0o777 == 0o755  # same file, same mode


def test_str_replace_without_new_str_deletes(tools, work):
    (work / "f.txt").write_text("a\nDELETE ME\nb\n")
    assert not edit(tools, command="str_replace", path="f.txt", old_str="DELETE ME\n").is_error
    assert (work / "f.txt").read_text() == "a\nb\n"


def test_str_replace_with_no_match_says_so_and_leaves_the_file(tools, work):
    (work / "f.txt").write_text("alpha\n")
    result = edit(tools, command="str_replace", path="f.txt", old_str="beta", new_str="x")
    assert result.is_error and "did not appear verbatim" in result.output
    assert (work / "f.txt").read_text() == "alpha\n"


def test_str_replace_with_several_matches_names_count_and_lines(tools, work):
    (work / "f.txt").write_text("x = 1\ny = 2\nx = 1\nz\nx = 1\n")
    result = edit(tools, command="str_replace", path="f.txt", old_str="x = 1", new_str="x = 9")
    assert result.is_error
    assert "3 times" in result.output and "lines 1, 3, 5" in result.output
    assert (work / "f.txt").read_text() == "x = 1\ny = 2\nx = 1\nz\nx = 1\n"


def test_insert_at_top_middle_and_end(tools, work):
    (work / "f.txt").write_text("one\ntwo\n")
    edit(tools, command="insert", path="f.txt", insert_line=0, insert_text="zero")
    edit(tools, command="insert", path="f.txt", insert_line=2, insert_text="one and a half\n")
    edit(tools, command="insert", path="f.txt", insert_line=4, insert_text="three")
    assert (work / "f.txt").read_text() == "zero\none\none and a half\ntwo\nthree\n"


def test_insert_after_a_last_line_without_newline_keeps_that_style(tools, work):
    (work / "f.txt").write_bytes(b"a\nb")
    edit(tools, command="insert", path="f.txt", insert_line=2, insert_text="c")
    assert (work / "f.txt").read_bytes() == b"a\nb\nc"


def test_insert_out_of_bounds_is_an_error_naming_the_range(tools, work):
    (work / "f.txt").write_text("a\nb\n")
    for line in (-1, 3):
        result = edit(tools, command="insert", path="f.txt", insert_line=line, insert_text="x")
        assert result.is_error and "0" in result.output and "2" in result.output
    assert (work / "f.txt").read_text() == "a\nb\n"


def test_non_utf8_files_get_a_clear_error_and_stay_untouched(tools, work):
    (work / "bin.dat").write_bytes(b"ok\n\xff\xfe\x00")
    for tool_input in ({"command": "view"}, {"command": "str_replace", "old_str": "ok"}):
        result = edit(tools, path="bin.dat", **tool_input)
        assert result.is_error and "not UTF-8" in result.output and "offset 3" in result.output
    assert (work / "bin.dat").read_bytes() == b"ok\n\xff\xfe\x00"


def test_relative_paths_resolve_against_the_workdir_not_the_process_cwd(tools, work):
    edit(tools, command="create", path="rel.txt", file_text="x")
    assert (work / "rel.txt").exists() and not (Path.cwd() / "rel.txt").exists()


def test_unknown_editor_command_lists_the_valid_ones(tools, work):
    result = edit(tools, command="undo_edit", path="f.txt")
    assert result.is_error
    assert all(c in result.output for c in ("view", "create", "str_replace", "insert"))


# -- path policy: the same answers as srt -----------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    place = tmp_path / "outside"
    place.mkdir()
    (place / "target.txt").write_text("original\n")
    return place


def test_write_through_a_symlink_to_outside_is_refused(tools, work, outside):
    (work / "link.txt").symlink_to(outside / "target.txt")
    for tool_input in (
        {"command": "create", "file_text": "pwned"},
        {"command": "str_replace", "old_str": "original", "new_str": "pwned"},
        {"command": "insert", "insert_line": 0, "insert_text": "pwned"},
    ):
        result = edit(tools, path="link.txt", **tool_input)
        assert result.is_error and "outside the work directory" in result.output
    assert (outside / "target.txt").read_text() == "original\n"


def test_write_into_a_symlinked_dir_or_via_dotdot_or_absolute_path_is_refused(tools, work, outside):
    (work / "linkdir").symlink_to(outside)
    for path in ("linkdir/new.txt", "../outside/new.txt", str(outside / "new.txt"), "/etc/x"):
        result = edit(tools, command="create", path=path, file_text="pwned")
        assert result.is_error and "outside the work directory" in result.output, path
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert not Path("/etc/x").exists()


def test_write_through_a_hard_link_is_refused(tools, work, outside):
    os.link(outside / "target.txt", work / "hard.txt")
    result = edit(tools, command="create", path="hard.txt", file_text="pwned")
    assert result.is_error and "hard link" in result.output
    assert (outside / "target.txt").read_text() == "original\n"


def test_a_symlink_that_stays_inside_the_workdir_is_followed_like_srt_does(tools, work):
    (work / "real.txt").write_text("a\n")
    (work / "alias.txt").symlink_to(work / "real.txt")
    assert not edit(
        tools, command="str_replace", path="alias.txt", old_str="a", new_str="b"
    ).is_error
    assert (work / "real.txt").read_text() == "b\n"
    assert (work / "alias.txt").is_symlink()


@pytest.mark.parametrize(
    "path",
    [".bashrc", "sub/.profile", ".gitconfig", ".mcp.json", ".git/config", ".git/hooks/pre-commit",
     ".git/commondir", ".git", ".vscode/settings.json", ".claude/commands/x.md"],
)  # fmt: skip
def test_writing_files_that_make_host_tools_run_code_is_refused(tools, work, path):
    result = edit(tools, command="create", path=path, file_text="evil")
    assert result.is_error and "refused" in result.output
    assert not (work / path).exists()


def test_reads_of_deny_listed_paths_are_refused_also_through_links(tools, work, home):
    (work / "key_link").symlink_to(home / ".ssh" / "id_test")
    for path in (str(home / ".ssh" / "id_test"), "key_link", str(home / ".ssh")):
        result = edit(tools, command="view", path=path)
        assert result.is_error and "denied" in result.output, path
        assert "FAKE-PRIVATE-KEY" not in result.output


def test_the_harness_state_dir_and_proc_are_unreadable(tools, work):
    state = tools.bash.policy.state_dir
    (state / "journal.db").write_text("transcripts")
    for path in (str(state / "journal.db"), "/proc/self/environ"):
        result = edit(tools, command="view", path=path)
        assert result.is_error and "denied" in result.output, path


def test_listing_skips_denied_entries(tools, home):
    (home / "notes.txt").write_text("")
    (home / "ssh-alias").symlink_to(home / ".ssh")
    listing = edit(tools, command="view", path=str(home)).output
    assert "notes.txt" in listing and "ssh-alias" not in listing


# -- toolbox: one place where tool errors become is_error results ----------------------------


def test_unknown_tool_is_an_error_result(tools):
    result = tools.run("computer", {"action": "screenshot"})
    assert result.is_error and "bash" in result.output and EDITOR in result.output


@pytest.mark.parametrize("tool_input", [None, "ls", ["ls"], 3])
def test_input_that_is_not_an_object_is_an_error_result(tools, tool_input):
    for name in ("bash", EDITOR):
        result = tools.run(name, tool_input)
        assert result.is_error and "object" in result.output


@pytest.mark.parametrize(
    ("name", "tool_input", "expected"),
    [
        ("bash", {}, "missing required field 'command'"),
        ("bash", {"command": 42}, "'command' must be str"),
        ("bash", {"command": "  "}, "command is empty"),
        ("bash", {"command": "ls", "restart": "yes"}, "'restart' must be bool"),
        (EDITOR, {"path": "f"}, "missing required field 'command'"),
        (EDITOR, {"command": "view"}, "missing required field 'path'"),
        (EDITOR, {"command": "create", "path": "f"}, "missing required field 'file_text'"),
        (EDITOR, {"command": "insert", "path": "f", "insert_line": "1", "insert_text": "x"},
         "'insert_line' must be int"),
        (EDITOR, {"command": "insert", "path": "f", "insert_line": True, "insert_text": "x"},
         "'insert_line' must be int"),
        (EDITOR, {"command": "view", "path": "f", "view_range": "1-2"}, "view_range"),
    ],
)  # fmt: skip
def test_missing_or_wrong_typed_fields_are_error_results(tools, work, name, tool_input, expected):
    (work / "f").write_text("a\nb\n")
    result = tools.run(name, tool_input)
    assert result.is_error and expected in result.output


def test_an_unexpected_exception_becomes_an_error_result(tools, work, monkeypatch):
    def broken(raw, tool_input):
        raise RuntimeError("a bug in the editor")

    monkeypatch.setattr(tools.editor, "_create", broken)
    result = edit(tools, command="create", path="f.txt", file_text="x")
    assert result.is_error and "RuntimeError: a bug in the editor" in result.output


def test_a_file_where_a_directory_should_be_is_a_plain_error(tools, work):
    (work / "afile").write_text("")
    result = edit(tools, command="create", path="afile/child.txt", file_text="x")
    assert result.is_error and "Not a directory" in result.output


def test_definitions_are_the_anthropic_defined_tools(tools):
    assert tools.definitions() == [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ]


def test_describe_tool_call_gives_one_short_line():
    assert sb.describe_tool_call("bash", {"command": "ls -la"}) == "bash $ ls -la"
    assert sb.describe_tool_call(EDITOR, {"command": "view", "path": "src/app.py"}) == (
        "view src/app.py"
    )
    assert sb.describe_tool_call(EDITOR, {"command": "str_replace", "path": "notes.md"}) == (
        "str_replace notes.md"
    )
    long = sb.describe_tool_call("bash", {"command": "echo " + "x" * 200 + "\nsecond line"})
    assert len(long) <= 80 and "\n" not in long
    assert sb.describe_tool_call("bash", {"restart": True}) == "bash (restart)"
    assert sb.describe_tool_call("bash", "not a dict").startswith("bash")


# -- bash: output, exit status, working directory -----------------------------------------------


@needs_sandbox
def test_huge_output_keeps_head_and_tail_and_states_what_was_elided(tools):
    result = bash(tools, "seq 1 200000")
    total = sum(len(f"{i}\n") for i in range(1, 200001))
    assert result.output.startswith("1\n2\n3\n")
    assert result.output.rstrip().endswith("200000")
    elided = total - sb._OUTPUT_HEAD_BYTES - sb._OUTPUT_TAIL_BYTES
    assert f"{elided:,} of {total:,} bytes elided" in result.output
    assert len(result.output) < 21_000


@needs_sandbox
def test_non_utf8_output_is_decoded_with_replacement(tools):
    result = bash(tools, r"printf 'ok \377\376 done\n'")
    assert not result.is_error
    assert result.output == "ok \ufffd\ufffd done"


@needs_sandbox
def test_exit_status_is_reported_and_marks_an_error(tools):
    result = bash(tools, "echo before; exit 7")
    assert result.is_error and result.exit_code == 7
    assert result.output == "before\n[exit status 7]"
    ok = bash(tools, "true")
    assert not ok.is_error and ok.exit_code == 0 and ok.output == "(no output)"


@needs_sandbox
def test_cwd_persists_between_calls_and_restart_resets_it(tools, work):
    (work / "sub").mkdir()
    assert bash(tools, "cd sub && export FOO=kept").exit_code == 0
    assert bash(tools, "pwd; echo FOO=$FOO").output == f"{work}/sub\nFOO="
    bash(tools, "exit 3")  # an early exit still records the directory
    assert bash(tools, "pwd").output == f"{work}/sub"
    restarted = tools.run("bash", {"restart": True})
    assert not restarted.is_error and str(work) in restarted.output
    assert bash(tools, "pwd").output == str(work)


@needs_sandbox
def test_a_vanished_cwd_falls_back_to_the_workdir(tools, work):
    bash(tools, "mkdir gone && cd gone")
    result = bash(tools, "rmdir ../gone; true")
    assert not result.is_error
    after = bash(tools, "pwd")
    assert after.output.splitlines()[-1] == str(work)


def test_without_the_sandbox_bash_still_scrubs_secrets_and_kills_on_timeout(
    tmp_path, home, monkeypatch
):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-secret")
    monkeypatch.setenv("FOO_TOKEN", "token-secret")
    with toolbox(make_policy(tmp_path, enabled=False), timeout_s=1.5) as tools:
        env = bash(tools, "env")
        assert "sk-ant-test-secret" not in env.output and "token-secret" not in env.output
        assert f"TMPDIR={tools.bash._tmp}" in env.output
        result = bash(tools, "sleep 987011 & sleep 987012")
        assert result.is_error and "timed out after 1.5 s" in result.output
        assert bash(tools, "sleep 987013 & echo launched").output == "launched"
        assert bash(tools, "echo next").output == "next"
    for marker in ("987011", "987012", "987013"):
        assert still_running_after(("sleep", marker)) == [], marker
