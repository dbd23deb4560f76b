"""pytest-benchmark setup for bench/: the machine's description in the report header and
in the saved JSON (pytest-benchmark's own machine_info has neither the CPU's model name
on every platform nor torch's thread count)."""

from harness import describe_machine


def pytest_report_header(config):
    machine = describe_machine()
    return (f"benchmark machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, "
            f"torch {machine['torch_version']} with {machine['torch_threads']} threads")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fused_rnn"] = describe_machine()
