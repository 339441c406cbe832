//! The two system calls the throwaway cluster needs and std does not offer.
#![allow(unsafe_code)]

use std::process::Command;

/// Makes the child receive SIGQUIT (PostgreSQL's immediate shutdown) when the thread that
/// started it dies, so a crashed or killed test run leaves no postmaster behind.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
            Ok(())
        });
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory effects in this process.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}
