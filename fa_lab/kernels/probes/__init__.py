"""Kernels that measure the machine, not attention: peak loops per instruction (`peaks`)
and memory streams (`stream`)."""
