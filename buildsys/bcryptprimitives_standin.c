/* A stand-in for Windows' bcryptprimitives.dll in wine prefixes, for tests only: wine 8 (Debian
 * 12's) has none, and Rust's standard library imports ProcessPrng from it (the blake3 wheel's
 * extension does). Windows 10 and 11 carry the real one; this file never goes into a bundle.
 * ProcessPrng fills a buffer with random bytes; here from RtlGenRandom (advapi32's
 * SystemFunction036), which wine implements. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
    while (length) {
        ULONG n = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, n)) return FALSE;
        data += n;
        length -= n;
    }
    return TRUE;
}
