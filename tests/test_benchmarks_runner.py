from benchmarks.__main__ import available
from benchmarks.common import markdown_table, update_markdown_block


def test_update_block_replaces_in_place_and_appends(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nintro\n")
    update_markdown_block(md, "a", "first")
    update_markdown_block(md, "b", "second")
    update_markdown_block(md, "a", "third")
    text = md.read_text()
    assert text.count("<!-- BEGIN a -->") == 1 and "third" in text and "first" not in text
    assert text.index("BEGIN a") < text.index("BEGIN b") and "intro" in text


def test_table_and_registry():
    assert markdown_table(["x", "y"], [[1, 0.123456]]).splitlines()[2] == "| 1 | 0.1235 |"
    assert "training_loop" in available()
