"""The VM acceptance test's machinery: guest image, qemu machine, scenario, guest probe."""
