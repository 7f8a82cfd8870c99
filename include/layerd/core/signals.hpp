// Signals as ring reads: the set is blocked for the thread and read from a signalfd, so a signal
// is just another completion on the loop.
#pragma once

#include <signal.h>
#include <sys/signalfd.h>

#include <initializer_list>

#include "layerd/core/cancel.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::core {

class SignalSet {
 public:
  // Blocks `signals` for the calling thread (and threads it creates later) and opens a signalfd.
  explicit SignalSet(std::initializer_list<int> signals);
  ~SignalSet();
  SignalSet(const SignalSet&) = delete;
  SignalSet& operator=(const SignalSet&) = delete;

  // Resolves to the next signal's number, or a negative errno (-ECANCELED when cancelled).
  Task<int> next(CancelSource* cancel = nullptr);

 private:
  sigset_t set_{};
  sigset_t previous_{};
  sys::UniqueFd fd_;
};

}  // namespace layerd::core
