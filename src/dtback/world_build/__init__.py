"""Training the identity world's components (VAE, face/body encoders, reader, base) and ``dtback world-components``.

It stands above training (the base is pretrained by the project's trainer), beside the CLI; the world's run-time
room (:mod:`dtback.world`) only loads what this builds. Entry point: :func:`dtback.world_build.components.build_world_components`.
"""
