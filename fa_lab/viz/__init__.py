"""Every figure of fa_lab, in one place (a tool: ``docs/ARCHITECTURE.md``):

* :mod:`~fa_lab.viz.core`: pyplot and the machine footer under measured figures;
* :mod:`~fa_lab.viz.lessons`: the lessons' concepts (attention, tiles, masks, memory,
  the memory hierarchy);
* :mod:`~fa_lab.viz.perf`: measurements (ladder, throughput, breakdown, claims, decoding,
  retrieval, INT8 error, peak memory);
* :mod:`~fa_lab.viz.decoding`: pictures of RoPE, split-KV and the KV cache; quantized
  caches' bytes, accuracy and time against their floors;
* :mod:`~fa_lab.viz.features`: flash-attn's window, softcap and ALiBi as masks and biases,
  a paged KV cache's block table, the probability mass attention sinks take, block masks
  and time against the tiles they compute;
* :mod:`~fa_lab.viz.distributed`: the ring's schedule and steps, causal work per rank,
  the shared-prefix speedup, when a network hides a ring step.

All names are re-exported here: ``fa_lab.viz.roofline(...)``.
"""

from fa_lab.viz.core import (footer)
from fa_lab.viz.lessons import (attention_matrix, running_state, tile_schedule, causal_masks,
                                heatmap, bars, tile_schedules, speedup_bars, allocations,
                                peak_memory_vs_n, keep_mask, bandwidth_curve, roofline,
                                traffic_bars, decode_floor)
from fa_lab.viz.perf import (plot_ladder, plot_throughput, plot_breakdown, plot_decode,
                             plot_generation, plot_decode_latency, plot_retrieval,
                             plot_k_histograms, plot_error_vs_length, plot_memory_sweep,
                             plot_sage_breakdown, plot_claims)
from fa_lab.viz.decoding import (plot_rope, plot_split_kv, plot_kv_cache, kv_formats,
                                 kv_time_vs_context)
from fa_lab.viz.features import (block_table, score_mods, sink_mass, block_masks, time_vs_tiles)
from fa_lab.viz.distributed import (ring_schedule, causal_work_bars, ring_steps,
                                    cascade_speedup, hide_thresholds)

__all__ = ['allocations', 'attention_matrix', 'bandwidth_curve', 'bars', 'block_table',
           'cascade_speedup', 'causal_masks', 'causal_work_bars', 'hide_thresholds',
           'ring_schedule', 'ring_steps', 'sink_mass', 'block_masks', 'time_vs_tiles',
           'decode_floor', 'footer', 'heatmap', 'keep_mask', 'peak_memory_vs_n',
           'plot_breakdown', 'plot_claims', 'plot_decode', 'plot_decode_latency', 'plot_error_vs_length',
           'plot_generation', 'plot_k_histograms', 'plot_kv_cache', 'kv_formats',
           'kv_time_vs_context', 'plot_ladder',
           'plot_memory_sweep', 'plot_retrieval', 'plot_rope', 'plot_sage_breakdown', 'plot_split_kv',
           'plot_throughput', 'roofline', 'running_state', 'score_mods', 'speedup_bars', 'tile_schedule',
           'tile_schedules', 'traffic_bars']
