"""Performance, side by side: our hook-based variants against PEFT's implementations of the same
methods, what an adapter costs over its base, what parasitic extraction costs a full fine-tune,
and how the study's training jobs best share a CPU.

    python -m lorabench.bench                                  # every section: MiniLM, SST-2 sentences
    python -m lorabench.bench --only peft --method dora --profile
    python -m lorabench.bench --quick --json out.json          # a tiny BERT, a few rounds: the smoke test

Every figure is a ratio of two things measured in this one process, alternately (A B A B ...,
after warm-up calls of each), as the median over rounds of each round's ratio: a machine that
slows down, or another job on it, slows both sides alike, so the ratio holds where absolute
seconds would not. Milliseconds are printed beside the ratios for scale only.

Sections (``--only NAME``, repeatable):

``peft``        one training step (forward, backward, AdamW step, the method's after-step hook,
                zero_grad) of ours and of PEFT's, from the same weights (our tensors copied into
                PEFT's, one of them random so the adapter path is not trivially zero), on the same
                layers (every linear layer outside the task head, named to PEFT one by one), batch
                and AdamW settings (``train.make_optimizer``, for PEFT's model too). First a
                step-0 check: both losses (eval mode, fp32) agree within 1e-5, so that the two
                compute the same thing. Targets: tokens/s ours / PEFT >= 1.0 (DoRA >= 1.15),
                memory ours / PEFT <= 1.0. Memory is the activations (on CPU the bytes autograd
                still holds for backward when the forward ends, ``held_for_backward``; on CUDA the
                step's peak allocation above what was allocated before it), plus the tensors the
                method adds to the model (trained and frozen adapter tensors, PEFT's copy of the
                task head, AdaLoRA's importance averages), plus AdamW's state.
``overhead``    a LoRA step against a full fine-tuning step (the floor is about two thirds: a
                frozen W needs no weight gradient and no optimizer state), and inference (eval
                mode, no grad) of an unmerged r=8 LoRA against the same model merged: target <= 1.10;
                PEFT's unmerged LoRA with the same tensors against the merged model, for reference.
``extraction``  a short full fine-tune through ``train.train`` with an ``Extractor`` every 10
                steps: each warm-started extraction against the median step since the one before
                (the median of those ratios) gives the share of training time, with that of its
                FLOPs and of the floor (its two products with dW), at intervals 10, 50 and 200
                (target < 0.25% at 50); the first extraction, from a Gaussian sketch, apart; beside
                the W0 snapshot's memory (copied, or memory-mapped from the checkpoint).
``jobs``        the default profile's two training jobs at a time with half the cores each, against
                one job with all the cores: LoRA and full fine-tuning steps in separate processes
                (two half-core jobs together, one all-core job of as many steps, one half-core job
                alone, alternately): the throughput ratio, and how much the two slow each other.
``scoring``     a decoder's perplexity of E2E's test references as the default study scores them,
                the references of one prompt sharing one pass over it, against each reference
                teacher-forced in full (the same loss within float rounding).
``warmstart``   a full fine-tune (``--extraction-steps`` steps; extractions every 50 steps from 200
                steps on, else every 10) whose every extraction is scored against the exact SVD:
                the extractor's two products with dW against one (half a step of the iteration,
                alternating sides), the largest error of the explained variance, with each
                scheme's share of training's FLOPs: what extraction under half a percent at
                steps of a few hundred tokens would cost in accuracy.
``trainer``     a ``transformers.Trainer`` full fine-tune (``--extraction-steps`` steps) with the
                ``ParasiticExtraction`` callback every 10 steps and without, alternately, twice:
                the runtime ratio (hooks and W0's snapshot included), and from the callback's own
                clocks each warm extraction against the mean step, as a share at interval 50.

Modules: ``common`` holds what every section measures on (``Setup``, ``make_setup``), the timing
and memory counters (``side_by_side``, ``held_for_backward``, ``Trainee``) and the rest that more
than one section uses (PEFT's config of a method, our r=8 LoRA); ``peft``, ``overhead``,
``extraction``, ``jobs``, ``scoring``, ``warm_start`` and ``trainer`` hold one section each; ``__main__`` the command. The
targets and names below are here for the sections and the tests alike.
"""

SECTIONS = ("peft", "overhead", "extraction", "jobs", "scoring", "warmstart", "trainer")
METHODS = ("lora", "dora", "vera", "pissa", "delora", "adalora", "qlora")
SPEED_TARGET = {"dora": 1.15}  # tokens/s ours / PEFT at least this; 1.0 for the others
MEMORY_TARGET = 1.0  # memory ours / PEFT at most this
LOSS_TOLERANCE = 1e-5  # step-0 losses of ours and PEFT's agree within this
INFERENCE_TARGET = 1.10  # unmerged / merged forward time at most this
EXTRACTION_INTERVALS = (10, 50, 200)
EXTRACTION_TARGET = (50, 0.25)  # at interval 50, under 0.25% of training time
# A realistic batch: 4,096 tokens a step in sequences of 128 (fewer where the model's positions
# end; the bench's 32 SST-2 sentences have about 420 tokens, the default study's 16 about 200),
# where a warm extraction every 50 steps should cost under 0.1% of training time.
LONG_BATCH = (4096, 128)
LONG_BATCH_TARGET = (50, 0.1)
SCORING_ROUNDS = 3  # rounds of the scoring section: one call of the real decoder's takes seconds
LORA_FLOOR = 2 / 3  # a LoRA step over a full step, counting the matmuls alone
TARGETS = "every linear layer outside the task head, named to PEFT one by one (PEFT trains the head as modules_to_save)"
