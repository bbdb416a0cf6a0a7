"""``esbridge status``'s table: one row per edge, partitions' positions labelled."""

from __future__ import annotations

from esbridge.system.status import EdgeStatus, format_table


def edge(positions: dict[str, int], relay: str | None) -> EdgeStatus:
    return EdgeStatus("Orders", "Payments", 3003, positions, 3, 1.5, None, 0, relay)


def test_partitioned_positions_are_labelled_and_lines_not_padded() -> None:
    table = format_table(
        [
            edge({"Orders#0/2": 1503, "Orders#1/2": 1497}, "none"),
            edge({"Orders": 3000}, None),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split("  ")[0] == "edge"
    assert lines[2].split() == [
        "Orders", "->", "Payments", "3003", "p0=1503", "p1=1497", "3", "1.5", "-", "0", "none",
    ]  # fmt: skip
    assert lines[3].split()[3:] == ["3003", "3000", "3", "1.5", "-", "0", "-"]
    assert all(line == line.rstrip() for line in lines)
    assert lines[0].index("position") == lines[2].index("p0=") == lines[3].index("3000")
