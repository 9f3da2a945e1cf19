//! The process's descriptor limit: every client is a socket, and a shell's
//! usual soft limit (1,024) would cap a tenant VM far below its
//! `--max-connections`. Raises the soft limit to the hard one; never lowers
//! anything.

/// Lets this process hold as many descriptors as its hard limit allows;
/// returns the limit now in force.
pub fn raise() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a
    // live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Raises the limit, and says so in one line when even the hard limit
/// leaves fewer descriptors than `connections` clients need.
pub fn raise_for(connections: usize) {
    // The VMM's own: KVM, eventfds, the listener, the state file, stdio.
    const OWN: u64 = 64;
    let limit = raise();
    let needed = u64::try_from(connections).unwrap_or(u64::MAX).saturating_add(OWN);
    if limit < needed {
        eprintln!(
            "mqvisor: note: this process may open {limit} descriptors, so it serves about {} clients, not {connections}; \
             raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)",
            limit.saturating_sub(OWN)
        );
    }
}
