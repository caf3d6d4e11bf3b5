//! Small operating-system facts and knobs: host name, open-files limit, CPU capabilities.
#![allow(unsafe_code)]

/// The machine's host name, if it has a usable one.
///
/// gethostname(2) rather than /proc/sys/kernel/hostname, which a hardened
/// unit (`ProcSubset=pid`) hides.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed; glibc NUL-terminates
    // or reports an error.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..len]).ok()?.trim();
    (!name.is_empty() && name != "(none)" && name != "localhost").then(|| name.to_string())
}

/// Raises the soft open-files limit to the hard limit; returns (old, new).
///
/// Each forwarded connection holds two descriptors, and distributions often
/// start services with a soft limit of 1024.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u32 on some 32-bit targets
    Ok((old as u64, lim.rlim_cur as u64))
}

/// On 32-bit ARM, whether the kernel reports the AES instructions (HWCAP2_AES).
#[cfg(target_arch = "arm")]
pub fn arm_hwcap2_has_aes() -> bool {
    const HWCAP2_AES: libc::c_ulong = 1;
    // SAFETY: getauxval only reads the process's auxiliary vector.
    let caps = unsafe { libc::getauxval(libc::AT_HWCAP2) };
    caps & HWCAP2_AES != 0
}

/// Takes an exclusive advisory lock on `file` without waiting; `Ok(false)` if
/// another process holds it. The lock lasts as long as the descriptor is open.
pub fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only acts on the descriptor, which `file` keeps open for this call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Asks the kernel to hand over accepted connections only once the client
/// has sent something (Linux TCP_DEFER_ACCEPT); a no-op elsewhere.
pub fn defer_accept(fd: std::os::fd::BorrowedFd<'_>, secs: u32) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        // SAFETY: a plain setsockopt on a valid descriptor with a c_int value.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (fd, secs);
    Ok(())
}
