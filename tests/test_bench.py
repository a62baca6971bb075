"""The benchmarks' helpers: sizes, and the CPU time a hypervisor steals."""
import pytest

from mpitrain.bench.common import cpu_ticks, format_size, parse_size


def test_sizes_round_trip():
    assert parse_size("4K") == 4096 and parse_size("64MiB") == 64 << 20 and parse_size("100") == 100
    assert format_size(64 << 20) == "64M" and format_size(100) == "100B"
    with pytest.raises(ValueError, match="not a size: '4Q'"):
        parse_size("4Q")


def test_stolen_ticks_count_the_hypervisors_share_of_the_wanted_time():
    # user nice system idle iowait irq softirq steal guest guest_nice: the guest ticks are
    # already in user and nice; idle and iowait are not wanted time.
    line = "cpu  700 10 90 5000 40 3 7 100 66 0\n"
    assert cpu_ticks(line) == (100, 700 + 10 + 90 + 3 + 7 + 100)
    assert cpu_ticks("cpu  1 2 3 4\n") is None  # an old kernel without steal
    assert cpu_ticks("intr 12 0 0\n") is None


def test_this_machines_counters_only_grow():
    first = cpu_ticks()
    if first is None:
        pytest.skip("no /proc/stat here (not Linux)")
    sum(i * i for i in range(200_000))  # some wanted time
    second = cpu_ticks()
    assert second[0] >= first[0] and second[1] >= first[1] and second[1] >= second[0]
