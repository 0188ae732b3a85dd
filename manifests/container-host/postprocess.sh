# Runs inside the tree, without network (see docs/manifest.md).
# A node generates its machine id on first boot.
: > /etc/machine-id
# Root logs in only with a key or console access configured by the operator.
passwd -l root >/dev/null
# The GRUB menu generator libostree runs (OSTREE_GRUB2_EXEC) is the host binary.
mkdir -p /usr/lib/cairn
ln -sf ../../bin/host /usr/lib/cairn/grub2-generate
# Every node makes its own SSH host keys at first boot (cairn-ssh-keygen.service).
rm -f /etc/ssh/ssh_host_*
# Name resolution goes through systemd-resolved (DHCP resolvers from
# networkd; *.cairn to the fleet network's DNS when the node is in one).
ln -sf ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
