# libostree's grub2 backend runs cairn's GRUB menu generator (the host binary)
# when `ostree admin …` changes deployments from a login shell.
export OSTREE_GRUB2_EXEC=/usr/lib/cairn/grub2-generate
