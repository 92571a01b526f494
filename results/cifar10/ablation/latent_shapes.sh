# The three latent shapes, 120 training steps each, one after the other on a quiet machine. Run from the
# repository root at commit 4cb0b7c (which has latent_channels); "A" is the flat latent, which was
# experiments/configs/cifar10.toml at that time's parent, 39c7e99: save it first with
#   git show 39c7e99:experiments/configs/cifar10.toml > /tmp/cifar10_flat.toml
export PYROVAE_DATA=../shared/data
run() { name=$1; config=$2; shift 2; /usr/bin/time -f "$name wall %e" .venv/bin/pyrovae train --config $config \
        --out /tmp/ab/$name --overwrite --max-steps 120 --quiet "$@"; cp /tmp/ab/$name/metrics.json results/cifar10/ablation/$name/; }
run B /tmp/cifar10_flat.toml --set model.z_dim=2048 --set model.network_options.stages=2 --set model.network_options.latent_channels=32
run C /tmp/cifar10_flat.toml --set model.z_dim=4096 --set model.network_options.stages=1 --set model.network_options.latent_channels=16
run A /tmp/cifar10_flat.toml
