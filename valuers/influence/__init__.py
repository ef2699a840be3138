"""Gradient-influence toolkit shared by the influence valuers (``logra``,
``influence_naive``; TRAK, EK-FAC or DataInf would build on the same pieces).

What an influence valuer values
    The game's grand-coalition model (all owners' data, fine-tuned by the game's
    own trainer, from ``game.finetuned``). Every training example z gets

        value(z) = Σ_layers g_evalᵀ (F + λI)⁻¹ g_z

    g_z     gradient (possibly projected) of z's training loss: the DPO loss of the
            pair under the fine-tuned model with the base π0 as reference
            (β = game.train.beta), or (``train_loss: sft``) the mean NLL of the
            chosen response (``data.example_losses``);
    g_eval  gradient of the *mean* eval loss over ``game.eval`` (same loss); with
            each eval pair's own loss gradient instead, the per-pair scores
            ``Valuation.pair_scores`` [N, E], whose row means are the values
            (``hooks.pair_query_vectors``, ``solve.pair_and_mean_scores``);
    F       the empirical Fisher of the train gradients, one block per layer:
            F = (1/N) Σ_z g_z g_zᵀ;
    λ       ``damping_scale`` × the mean eigenvalue of F (= trace(F) / dim)
            (``solve.precondition``).

Sign convention
    The influence of up-weighting z on the eval loss is I(z) = −g_evalᵀ (F+λI)⁻¹ g_z.
    value(z) = −I(z): a **positive value means removing z would increase the eval
    loss (z helps)**; a negative value means z hurts (e.g. a flipped preference
    pair). To first order, removing z (weight 1/N) changes the eval loss by
    +value/N; values are on the loss-gradient scale, not the game's utility scale
    (compare ranks). An owner's value is the sum of its examples' values, and point
    values follow ``game.flat_pairs()``.

Modules
    data         encoding pairs into rows, batches, differentiable row log-probs, the losses
    subject      the fine-tuned model under study (from ``game.finetuned``), reference log-probs
    layers       the watched layers and their shapes
    projection   random / eigen / dense projections, seeded per layer
    hooks        ``GradientLogger``: projected per-example gradients from hooks (LoGra)
    per_example  full per-example gradients with ``torch.func`` (the naive reference)
    solve        damped empirical-Fisher preconditioning and influence scores
    logs         memory-mapped gradient logs on disk
    settings     the settings every influence valuer shares
"""
