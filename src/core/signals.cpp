#include "layerd/core/signals.hpp"

#include <pthread.h>

#include "layerd/core/ops.hpp"
#include "layerd/sys/error.hpp"

namespace layerd::core {

SignalSet::SignalSet(std::initializer_list<int> signals) {
  sigemptyset(&set_);
  for (int sig : signals) sigaddset(&set_, sig);
  int res = pthread_sigmask(SIG_BLOCK, &set_, &previous_);
  if (res != 0) throw Error(res, "blocking signals");
  fd_.reset(::signalfd(-1, &set_, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd_) {
    int err = errno;
    (void)pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
    throw Error(err, "signalfd");
  }
}

SignalSet::~SignalSet() {
  fd_.reset();
  (void)pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
}

Task<int> SignalSet::next(CancelSource* cancel) {
  signalfd_siginfo info{};
  for (;;) {
    // A non-blocking signalfd would make the ring's read return -EAGAIN at once; the ring then
    // arms a poll internally and retries when a signal is pending.
    int res = co_await core::read(fd_.get(), &info, sizeof info).cancel_on(cancel);
    if (res == -EAGAIN || res == -EINTR) continue;
    if (res < 0) co_return res;
    if (res != sizeof info) co_return -EIO;
    co_return static_cast<int>(info.ssi_signo);
  }
}

}  // namespace layerd::core
