#!/usr/bin/env bash
# Installs (when missing) the Debian packages the test cluster needs: SLURM, munge, PMIx, and
# slurmdbd + MariaDB for accounting (sacct). Idempotent; a no-op when everything is there.
set -euo pipefail
ACCT=${SHARDINFER_TEST_ACCOUNTING:-${SLURM_TEST_ACCOUNTING:-1}}
log() { echo "[install-packages] $(date +%T) $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root to install packages"; exit 1; }
exec 9>/tmp/shardinfer-install-packages.lock; flock 9  # clusters started side by side: one apt at a time
pkgs=()
for c in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${c%%:*}" >/dev/null || pkgs+=("${c#*:}")
done
# libpmix-dev: Debian's mpi/pmix plugin dlopen()s the UNVERSIONED
# .../pmix2/lib/libpmix.so (dev symlink); with only libpmix2 slurmd logs
# "pmi/pmix: can not load PMIx library" and `srun --mpi=pmix` steps time out.
# slurmd only sees it if it is installed before slurmd starts.
ls /usr/lib/*/pmix2/lib/libpmix.so >/dev/null 2>&1 || pkgs+=(libpmix-dev)
if [ "$ACCT" = 1 ]; then
  for c in slurmdbd:slurmdbd mariadbd:mariadb-server mariadb-install-db:mariadb-server; do
    command -v "${c%%:*}" >/dev/null || pkgs+=("${c#*:}")
  done
fi
# MPI for the mpirun / srun --mpi=pmix tests (mpi4py's wheel loads the system libmpi)
command -v mpirun >/dev/null || pkgs+=(openmpi-bin libopenmpi-dev)
if [ ${#pkgs[@]} -gt 0 ]; then
  pkgs+=(slurm-wlm)
  log "apt-get install ${pkgs[*]}"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep postinst from starting services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -q --no-install-recommends $(printf '%s\n' "${pkgs[@]}" | sort -u) >&2
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

