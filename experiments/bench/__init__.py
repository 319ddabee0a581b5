"""Performance benchmarks: ``python -m experiments.bench [--quick] [--out FILE]``.

Every figure is measured in this one process, on the machine it runs on,
after warm-up, over ``--repeats`` repetitions of ``--steps-per-repeat`` steps
each, ending with ``jax.block_until_ready``. The variants of an item are
timed in turn within each repetition, in reverse order every other one
(A B, B A, A B, ...), so that drift of the machine falls on both sides of a
ratio. A ratio is the median of its per-repetition ratios, with a 95%
distribution-free interval for that median from order statistics, and a
verdict against its target: ``met`` when the whole interval meets it,
``missed`` when none of it does, ``inconclusive`` otherwise (``stats``; the
JSON has ``<name>_ratio``, ``<name>_ci`` and ``<name>_verdict``). Repetitions
(defaults): 20 x 5 steps on a GPU; on CPU with ResNet-18 / VGG-16, 9 x 1
step (a ResNet-18 step of 8 x 32 images takes about 6.5 s on the 2-core
machine); 9 x 1 with ``--quick``. Nine repetitions are the fewest whose
interval reaches 95% with one order statistic cut off each side (96.1%);
six give the minimum to the maximum (96.9%), and fewer no verdict. Items:

1. gate overhead: a local (non-sync) step of the gated ``average`` step over
   the same local step compiled with no collective and no gate. Target <= 1.02.
   1b. the same with K = 8 workers vmapped on one device. Target <= 1.02.
2. sync cost: a step that averages (schedule ``constant(1)``) over a
   ``allreduce`` step of the same model. Target <= 1.05.
3. compilations of the train step over a whole run of every method, counted
   from jax's backend-compile events while the run's steps execute (item 6's
   runs count for their methods; the others get a digits run). Target 1.
4. throughput, images/s/device: ADPSGD's local step, the allreduce step and
   a plain single-device flax loop (``flax.training.train_state``, jitted,
   state donated). Target: ADPSGD local >= 0.98x the plain loop. The host
   input pipeline's rate is measured on its own to show whether it could be
   the bottleneck (the training loop prefetches it in a thread).
5. device memory of the compiled step versus the plain loop, from XLA's
   compiled memory analysis (arguments + outputs - aliased + temporaries),
   which every backend reports; extra memory is given in parameter copies.
6. syncs, bytes and predicted time to a target test accuracy on digits for
   each strategy, from real training runs; predicted wall-clock for
   ``--predict-workers`` workers at 10 and 100 Gbps by the time model
   (docs/algorithm.md, "Time model") with measured compute time, and the
   speedup over ``allreduce``. Its projection (claim C3): those steps and syncs
   with ResNet-18's 44.7 MB per round and ResNet-18's local step at batch 32,
   without communication, measured in this run on one device
   (``steps.projection_compute``), charged to every method alike, beside the
   paper's ranges (1.46-1.95x at 10 Gbps, 1.14-1.27x at 100 Gbps).
7. claim C2: bytes of ADPSGD versus QSGD at 8 bits (s = 127) and 4 bits
   (s = 7) to reach the same training loss.
8. simulation: images/s of K workers vmapped on one device (``--sim-workers``,
   default 8, 32, 64) over one worker with a K times larger batch, the
   physical limit of simulating workers. Target >= 0.8. With the compiled
   memory per worker. Items 1b and 8 have their own model and per-worker
   batch (``--sim-model``: the MLP on CPU; see ``simulation``).

On CPU, items 1-2 use every (virtual) device, and items 4-5 a single device:
virtual CPU devices share the same cores, so a per-device rate measured on
several of them would measure the sharing, not the step.

Modules: ``__main__`` (the command line and the order of the items),
``harness`` (alternating timing, compile counting, compiled memory),
``references`` (the task and the programs the step is measured against),
``steps`` (items 1, 2, 4, 5 and item 6's compute), ``simulation`` (items 1b, 8), ``runs`` (items 3, 6, 7:
real training runs), ``stats`` (ratios, intervals, verdicts) and ``render`` (the Markdown table).
"""
